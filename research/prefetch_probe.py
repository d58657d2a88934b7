"""How much of a decode step's critical-path fetch could be issued earlier (docs/research/transfer.md).

Runs the PEERS fidelity protocol's teacher-forced windows (essays, 3,000-token context, 64 tokens)
through HeteroCache's default policy with the PyTorch refill (identical to the C one), records every
refill's incoming pages (wanted, not resident: what crosses the link today, on the critical path), and
scores predictors that are known one layer (or one step) before the attention that needs the pages:

- ``prev-layer``: layer l's resident positions after its own refill of this step (every KV head of
  the row) name the pages of layer l+1 that hold them, ranked by how many; the top ``factor x width``
  are prefetched for each sequence of layer l+1 (OmniKV's cross-layer observation);
- ``next-query``: layer l+1's query computed from layer l's *input* hidden state (its input norm,
  q projection and RoPE at the step's position: InfiniGen's speculation, known as soon as layer l
  starts), scored against layer l+1's own index; its top ``factor x width`` pages are prefetched.

A hit is an incoming page that the predictor prefetched; the rest stays on the critical path. Prints,
per predictor and factor, the share of incoming pages hit and the bytes prefetched per decode token
(wasted prefetches included), beside today's critical bytes.

    OMP_NUM_THREADS=2 .venv/bin/python research/prefetch_probe.py --keep 0.25 --windows 0,1,2
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

import heterocache as hc
from heterocache.eval.fidelity import peers_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--windows", default="0,1,2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--factors", default="1,2,4")
    parser.add_argument("--option", action="append", default=[], help="heterocache option NAME=VALUE")
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--context", type=int, default=3000)
    args = parser.parse_args()
    options = {"refill": "torch"}
    for pair in args.option:
        name, _, raw = pair.partition("=")
        options[name] = json.loads(raw) if raw[:1].isdigit() or raw in ("true", "false") else raw
    factors = [float(f) for f in args.factors.split(",")]
    model, tok = hc.load_model(args.model, dtype=args.dtype)
    windows = peers_windows(tok, args.context, args.tokens)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # predictor -> [hit pages, prefetched pages]
    incoming_total = steps_total = 0
    page_bytes = None
    for window in [int(w) for w in args.windows.split(",")]:
        _, context, continuation = windows[window]
        cache = hc.make_cache(model, "heterocache", args.keep, **options)
        runtime = cache.method.runtime
        log: list[dict] = []  # one entry per (step, layer) refill
        pending: dict[int, torch.Tensor] = {}  # layer -> its speculated page scores of this step
        original = runtime.engine.swap

        def spy(layer, slots, chosen, original=original, log=log, pending=pending):
            before = slots.resident.clone()
            original(layer, slots, chosen)
            log.append({"layer": layer.layer_idx, "before": before, "after": slots.resident.clone(),
                        "positions": slots.page_positions, "unit": slots.unit, "seq": list(slots.seq),
                        "next_query_scores": pending.pop(layer.layer_idx, None)})

        runtime.engine.swap = spy
        inputs: dict[int, torch.Tensor] = {}
        decoder = model.model.layers
        hooks = [layer.register_forward_pre_hook(
            lambda mod, a, kw, i=i, inputs=inputs: inputs.__setitem__(i, (a[0] if a else kw["hidden_states"]).detach()),
            with_kwargs=True) for i, layer in enumerate(decoder)]
        original_before = runtime.before_attention

        def speculate(layer, queries, original_before=original_before, inputs=inputs, pending=pending,
                      runtime=runtime, decoder=decoder):
            idx = layer.layer_idx
            slots = runtime.layers.get(idx)
            if slots is not None and slots.index is not None and idx > 0 and queries.shape[2] == 1:
                pending[idx] = _next_query(model, decoder[idx], inputs[idx - 1], layer.seen - 1, slots)
            original_before(layer, queries)

        runtime.before_attention = speculate
        with torch.inference_mode():
            model(torch.tensor([context]), **hc.cache_kwargs(cache, model))
            for token in continuation[:-1]:
                model(torch.tensor([[token]]), **hc.cache_kwargs(cache, model))
        for hook in hooks:
            hook.remove()
        layer0 = cache.layers[0]
        page_bytes = 2 * log[0]["unit"] * layer0.head_dim * torch.empty((), dtype=layer0.dtype).element_size()
        n_layers = max(e["layer"] for e in log) + 1
        by_step = [log[i:i + n_layers] for i in range(0, len(log), n_layers)]
        steps_total += len(by_step)
        for step in by_step:
            for entry in step:
                incoming = entry["after"] & ~entry["before"]  # (n, P)
                incoming_total += int(incoming.sum())
                width = int(entry["after"].sum(-1).max())
                for factor in factors:
                    k = max(1, int(round(factor * width)))
                    nq = entry.get("next_query_scores")
                    for name, predicted in (("prev-layer", _prev_layer(step, entry, k)),
                                            ("next-query", None if nq is None else _top(nq - nq.min() + 1, k))):
                        if predicted is None:
                            continue
                        key = f"{name} x{factor:g}"
                        totals[key][0] += int((incoming & predicted).sum())
                        totals[key][1] += int((predicted & ~entry["before"]).sum())
        cache.close()
    per_token = 1 / max(steps_total, 1) / 2**20
    print(f"keep {args.keep}: {steps_total} decode steps, today's critical fetch "
          f"{incoming_total * page_bytes * per_token:.2f} MiB per token (every incoming page)")
    print("| predictor | incoming pages hit | critical MiB/token left | prefetched MiB/token |")
    print("|---|---|---|---|")
    for key, (hit, fetched) in totals.items():
        share = hit / incoming_total if incoming_total else 0.0
        left = (incoming_total - hit) * page_bytes * per_token
        print(f"| {key} | {share:.1%} | {left:.2f} | {fetched * page_bytes * per_token:.2f} |")


def _prev_layer(step: list[dict], entry: dict, k: int) -> torch.Tensor | None:
    """Top-``k`` pages of each sequence of ``entry``'s layer by how many of the previous layer's resident
    positions (this step, every KV head of the row) they hold."""
    previous = [e for e in step if e["layer"] == entry["layer"] - 1]
    if not previous:
        return None
    prev = previous[0]
    length = int(max(prev["positions"].max(), entry["positions"].max())) + 1
    held = torch.zeros(length, dtype=torch.float32)
    pages = prev["after"][:, :, None].expand_as(prev["positions"])
    held.index_add_(0, prev["positions"][pages].flatten(), torch.ones(int(pages.sum())))
    score = held[entry["positions"]].sum(-1)  # (n, P) previous-layer positions per page
    return _top(score, k)


def _next_query(model, decoder_layer, hidden: torch.Tensor, position: int, slots) -> torch.Tensor:
    """Page scores ``(n, P)`` of ``decoder_layer``'s index for the query it would compute from ``hidden
    (1, 1, hidden)`` (the previous layer's input) at ``position`` (the runtime's ``layer_query``)."""
    from heterocache.retrieval.speculate import layer_query

    last = hidden[:, -1:]
    q = layer_query(decoder_layer, last, model.model.rotary_emb(last, torch.tensor([[position]])))
    grouped = q.reshape(len(slots.seq), -1, q.shape[-1])
    return slots.index.page_scores(grouped, slots.base)


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, score.shape[1])
    chosen = score.topk(k, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, chosen, True) & (score > 0)


if __name__ == "__main__":
    main()
