"""A device-resident pool of recently evicted pages: how many incoming bytes would it serve? (docs/research/transfer.md)

Runs the PEERS fidelity windows (essays, 3,000-token context, 64 teacher-forced tokens) through
HeteroCache's default policy with the PyTorch refill and records, for every (layer, sequence), the
pages each refill brings in and the pages it evicts. A victim pool of ``V`` pages per sequence keeps
the most recently evicted pages on the device (LRU); an incoming page found there is copied on the
device instead of crossing the link. The pool changes where a page comes from, never which pages are
chosen, so quality is exactly the default's; it costs device memory, reported as a share of the full
KV and of the keep budget (at equal device bytes that memory would come out of the kept tokens).

    OMP_NUM_THREADS=1 .venv/bin/python research/pool_probe.py --keep 0.1 --pools 0.25,0.5,1,2
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import torch

import heterocache as hc
from heterocache.eval.fidelity import peers_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--windows", default="0,1,2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--pools", default="0.25,0.5,1,2", help="pool sizes as multiples of each sequence's width")
    parser.add_argument("--context", type=int, default=3000)
    args = parser.parse_args()
    factors = [float(f) for f in args.pools.split(",")]
    model, tok = hc.load_model(None, dtype="float32")
    windows = peers_windows(tok, args.context, args.tokens)
    hits = dict.fromkeys(factors, 0)
    incoming_total = pool_pages = 0
    kv_bytes = page_bytes = None
    for window in [int(w) for w in args.windows.split(",")]:
        _, context, continuation = windows[window]
        cache = hc.make_cache(model, "heterocache", args.keep, refill="torch")
        engine = cache.method.runtime.engine
        pools: dict[float, dict[tuple[int, int], OrderedDict]] = {f: {} for f in factors}
        original = engine.swap

        def spy(layer, slots, chosen, original=original, pools=pools):
            nonlocal incoming_total
            before = slots.resident.clone()
            original(layer, slots, chosen)
            after = slots.resident
            for row in range(after.shape[0]):
                came = (after[row] & ~before[row]).nonzero().flatten().tolist()
                left = (before[row] & ~after[row]).nonzero().flatten().tolist()
                incoming_total += len(came)
                for factor in factors:
                    capacity = max(1, round(factor * slots.width))
                    pool = pools[factor].setdefault((layer.layer_idx, row), OrderedDict())
                    for page in came:
                        if page in pool:
                            hits[factor] += 1
                            del pool[page]  # resident again
                    for page in left:
                        pool[page] = True
                        pool.move_to_end(page)
                        while len(pool) > capacity:
                            pool.popitem(last=False)

        engine.swap = spy
        with torch.no_grad():
            model(torch.tensor([context]), **hc.cache_kwargs(cache, model), use_cache=True)
            for token in continuation:
                model(torch.tensor([[token]]), **hc.cache_kwargs(cache, model), use_cache=True)
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4 * len(context)
        unit = next(iter(engine.layers.values())).unit
        page_bytes = 2 * unit * head_dim * 4
        pool_pages = sum(s.width * s.resident.shape[0] for s in engine.layers.values())
    print(f"keep {args.keep}: {incoming_total} incoming pages over {len(args.windows.split(','))} windows "
          f"x {args.tokens} tokens; dynamic slots {pool_pages} pages ({pool_pages * page_bytes / 2**20:.2f} MiB, "
          f"{pool_pages * page_bytes / kv_bytes:.3f} of the KV)")
    print("| pool (x width) | incoming pages served by the pool | link bytes left | pool MiB | pool / full KV | pool / keep budget |")
    print("|---|---|---|---|---|---|")
    for factor in factors:
        size = sum(max(1, round(factor * s.width)) * s.resident.shape[0] for s in engine.layers.values())
        share = hits[factor] / max(incoming_total, 1)
        print(f"| {factor:g} | {share:.1%} | {1 - share:.1%} | {size * page_bytes / 2**20:.2f} | "
              f"{size * page_bytes / kv_bytes:.4f} | {size * page_bytes / kv_bytes / args.keep:.2f} |")


if __name__ == "__main__":
    main()
