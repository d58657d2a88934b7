"""Speculative refill with a critical correction: quality against critical / prefetched bytes
(docs/research/transfer.md, round 2).

Round 1 (``prefetch_probe.py``) showed that layer l+1's query computed from layer l's input hidden
state (InfiniGen's speculation) names two thirds of the pages layer l+1 will want. Here that
prediction *drives* the refill, so quality changes and is measured:

1. speculative refill (prefetched bytes: known a whole layer ahead): when layer l starts, layer
   l+1's dynamic slots are refilled with the pages its speculated query points at, under the same
   drift gate as the default (on the speculated query's own anchors);
2. correction (critical bytes: the attention waits for them): where the true query drifted (the
   default gate on it), its ``correct x width`` best pages must be resident; the missing ones
   replace the resident pages the true query ranks lowest. ``correct 1`` ends where the true query
   drifted with its own top pages (the default without its ``stick`` bonus); ``correct 0`` trusts
   the speculation alone.

The first retrieving layer has no earlier layer to speculate from and keeps the default (critical).
Fidelity is the PEERS protocol's (3 windows of 3,000 essay tokens, 64 teacher-forced tokens, KL of
FullKV's next-token distribution to the method's, top-1 agreement), FullKV through DynamicCache;
bytes are counted from the slots' residency before and after each refill (keys + values per page).

    OMP_NUM_THREADS=1 .venv/bin/python research/speculate.py --keep 0.25 --correct 1,0.5,0.25,0
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import DynamicCache

import heterocache as hc
from heterocache.eval.fidelity import peers_windows
from heterocache.methods.heterocache.dynamic import choose, unit_scores
from heterocache.retrieval.slots import choose_units
from heterocache.retrieval.speculate import layer_query


def speculated_query(model, decoder_layer, hidden: torch.Tensor, position: int, n: int) -> torch.Tensor:
    """``(n, R, D)``: ``decoder_layer``'s grouped decode query computed from ``hidden (1, 1, hidden)``
    (the previous layer's input) at ``position``: the runtime's own ``layer_query``."""
    last = hidden[:, -1:]
    q = layer_query(decoder_layer, last, model.model.rotary_emb(last, torch.tensor([[position]])))
    return q.reshape(n, -1, q.shape[-1])


class Speculation:
    """Patches a HeteroCache runtime: speculative refill + correction (``correct`` None: the default)."""

    def __init__(self, model, cache, correct: float | None):
        self.model, self.runtime, self.correct = model, cache.method.runtime, correct
        self.inputs: dict[int, torch.Tensor] = {}
        self.anchors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.critical = self.prefetched = 0  # pages
        self.page_bytes = 0
        self.decoder = model.model.layers
        self.hooks = [layer.register_forward_pre_hook(self._keep_input, with_kwargs=True)
                      for layer in self.decoder]
        self.first = None
        self.runtime.before_attention = self.before_attention

    def _keep_input(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.inputs[id(module)] = hidden.detach()

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def _swap(self, layer, slots, chosen) -> int:
        before = slots.resident.clone()
        self.runtime.engine.swap(layer, slots, chosen)
        return int((slots.resident & ~before).sum())

    def before_attention(self, layer, queries: torch.Tensor) -> None:
        runtime = self.runtime
        slots = runtime.layers.get(layer.layer_idx)
        if slots is None or not slots.width:
            return
        runtime._prepare(layer, slots)
        slots.native = None  # PyTorch refill only
        if not self.page_bytes:
            self.page_bytes = 2 * slots.unit * layer.head_dim * torch.empty((), dtype=layer.dtype).element_size()
        b, hq, q, d = queries.shape
        n_kv = layer.n_kv_heads
        grouped = queries.reshape(b * n_kv, (hq // n_kv) * q, d)
        if not slots.every_row:
            grouped = grouped[slots.seq_ids]
        idx = layer.layer_idx
        if self.first is None:
            self.first = idx
        previous = self.decoder[idx - 1] if idx > 0 else None
        if self.correct is None or q != 1 or idx == self.first or previous is None:
            chosen = choose(slots, grouped, runtime.settings.stick, runtime._drift_gate(slots, grouped))
            self.critical += self._swap(layer, slots, chosen)
            return
        # 1. speculative refill (issued when layer idx - 1 started: prefetched)
        spec = speculated_query(self.model, self.decoder[idx], self.inputs[id(previous)], layer.seen - 1,
                                len(slots.seq))
        keep = self._spec_gate(idx, slots, slots.index.project(spec))
        score = unit_scores(slots, spec, runtime.settings.stick)
        score = torch.where(keep[:, None], slots.resident.float(), score)
        self.prefetched += self._swap(layer, slots, choose_units(slots, score))
        # 2. correction with the true query (critical)
        count = int(round(self.correct * slots.width))
        if count <= 0:
            return
        steady = runtime._drift_gate(slots, grouped)  # the true query's gate: no correction while it holds
        true = unit_scores(slots, grouped, 0.0).clamp(min=-1e3)
        top = torch.zeros_like(slots.resident).scatter_(1, true.topk(count, dim=-1).indices, True)
        if steady is not None:
            top &= ~steady[:, None]
        final = 1e8 * top + 1e4 * slots.resident + 1e-3 * true
        self.critical += self._swap(layer, slots, choose_units(slots, final))

    def _spec_gate(self, idx: int, slots, projected: torch.Tensor) -> torch.Tensor:
        """The default drift gate (relative Frobenius distance of the projected queries to those of the
        last refill) on the speculated query, with its own anchors."""
        n = projected.shape[0]
        drift = self.runtime.settings.drift
        if drift <= 0:
            return torch.zeros(n, dtype=torch.bool)
        anchors, anchored = self.anchors.get(idx, (torch.zeros_like(projected), torch.zeros(n, dtype=torch.bool)))
        moved = (projected - anchors).square().sum((1, 2))
        keep = anchored & (moved < drift ** 2 * anchors.square().sum((1, 2)))
        self.anchors[idx] = (torch.where(keep[:, None, None], anchors, projected), anchored | ~keep)
        return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--windows", default="0,1,2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--correct", default="1,0.5,0.25,0", help="comma list; 'default' = today's policy")
    parser.add_argument("--option", action="append", default=[], help="heterocache option NAME=VALUE")
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", type=int, default=3000)
    args = parser.parse_args()
    options = {"refill": "torch"}
    for pair in args.option:
        name, _, raw = pair.partition("=")
        options[name] = json.loads(raw) if raw[:1].isdigit() or raw in ("true", "false") else raw
    configs = [None] + [float(c) for c in args.correct.split(",")]
    model, tok = hc.load_model(args.model, dtype=args.dtype)
    windows = peers_windows(tok, args.context, args.tokens)
    rows = {c: {"kl": 0.0, "top1": 0, "n": 0, "critical": 0, "prefetched": 0, "steps": 0, "page_bytes": 0}
            for c in configs}
    for window in [int(w) for w in args.windows.split(",")]:
        _, context, continuation = windows[window]
        with torch.inference_mode():
            full = _logits(model, context, continuation, hc.cache_kwargs(DynamicCache(config=model.config), model))
            for correct in configs:
                cache = hc.make_cache(model, "heterocache", args.keep, **options)
                spec = Speculation(model, cache, correct)
                logits = _logits(model, context, continuation, hc.cache_kwargs(cache, model))
                spec.close()
                cache.close()
                p = torch.log_softmax(full.float(), -1)
                m = torch.log_softmax(logits.float(), -1)
                row = rows[correct]
                row["kl"] += float((p.exp() * (p - m)).sum(-1).sum())
                row["top1"] += int((full.argmax(-1) == logits.argmax(-1)).sum())
                row["n"] += full.shape[0]
                row["critical"] += spec.critical
                row["prefetched"] += spec.prefetched
                row["steps"] += len(continuation) - 1
                row["page_bytes"] = spec.page_bytes
    print(f"keep {args.keep}, options {options}")
    print("| policy | KL / top-1 | critical MiB/token | prefetched MiB/token |")
    print("|---|---|---|---|")
    for correct, row in rows.items():
        name = "default (all critical)" if correct is None else f"speculate + correct {correct:g}"
        per = row["page_bytes"] / max(row["steps"], 1) / 2**20
        print(f"| {name} | {row['kl'] / row['n']:.4f} / {row['top1'] / row['n']:.3f} | "
              f"{row['critical'] * per:.2f} | {row['prefetched'] * per:.2f} |")


def _logits(model, context: list[int], continuation: list[int], kwargs: dict) -> torch.Tensor:
    """Next-token logits ``(M, V)`` at the last context token and the first M - 1 continuation tokens."""
    out = model(torch.tensor([context]), use_cache=True, **kwargs)
    logits = [out.logits[0, -1]]
    for token in continuation[:-1]:
        out = model(torch.tensor([[token]]), use_cache=True, **kwargs)
        logits.append(out.logits[0, -1])
    return torch.stack(logits)


if __name__ == "__main__":
    main()
