"""Fidelity screening of many HeteroCache configurations in one process (docs/research/quality.md).

The PEERS.md protocol of ``heterocache eval fidelity`` (the same functions: essays joined with a blank
line, ``window_offsets``, ``teacher_forced_logits``, ``score_window``), with one model load for all
configurations and the FullKV references kept as safetensors under ``--refs``:

    OMP_NUM_THREADS=1 .venv/bin/python research/screen.py --keeps 0.25,0.1 --out screen.jsonl \\
        "p16bf16=heterocache,page=16,summary_dtype=bfloat16" "default=heterocache"

A configuration is ``LABEL=METHOD[,OPTION=VALUE...]``. One JSON line per window x configuration x
keep in ``--out``; the means over windows are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="LABEL=METHOD[,OPTION=VALUE...]")
    parser.add_argument("--windows", default="0,1,2", help="window indices of the 3-window protocol")
    parser.add_argument("--tokens", type=int, default=64, help="continuation tokens scored per window")
    parser.add_argument("--keeps", default="0.25,0.1")
    parser.add_argument("--out", required=True, help="JSONL file (appended)")
    parser.add_argument("--refs", default=str(Path.home() / ".cache" / "heterocache" / "screen-refs"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import DynamicCache

    import heterocache as hc
    from heterocache.eval.fidelity import score_window, teacher_forced_logits, window_offsets
    from heterocache.eval.tasks.essays import PEERS_SEPARATOR, essay_text

    model, tok = hc.load_model()
    ids = tok(essay_text(None, PEERS_SEPARATOR), add_special_tokens=False, verbose=False)["input_ids"]
    offsets = window_offsets(len(ids), 3000, 64, 3, 1234)
    refs = Path(args.refs)
    refs.mkdir(parents=True, exist_ok=True)
    means: dict[tuple[str, float], list[dict]] = {}
    for window in (int(w) for w in args.windows.split(",")):
        offset = offsets[window]
        context, continuation = ids[offset: offset + 3000], ids[offset + 3000: offset + 3000 + args.tokens]
        path = refs / f"ref_{offset}_{args.tokens}.safetensors"
        if path.exists():
            reference = load_file(path)["logits"]
        else:
            full = DynamicCache(config=model.config)
            reference = teacher_forced_logits(
                model, context, continuation,
                lambda x, _full=full, **kw: model(x, past_key_values=_full, use_cache=True, **kw).logits)
            save_file({"logits": reference.contiguous()}, path)
        for spec in args.configs:
            label, _, rest = spec.partition("=")
            method, *parts = rest.split(",")
            options = {k: value(v) for k, v in (p.split("=", 1) for p in parts)}
            for keep in (float(k) for k in args.keeps.split(",")):
                cache = hc.make_cache(model, method, keep, **options)
                kwargs = hc.cache_kwargs(cache, model)
                start = time.perf_counter()
                logits = teacher_forced_logits(model, context, continuation,
                                               lambda x, _kw=kwargs, **kw: model(x, use_cache=True, **_kw, **kw).logits)
                stats = cache.stats()
                cache.close()
                line = {"label": label, "method": method, "options": options, "keep": keep, "window": window,
                        **score_window(reference, logits, torch.tensor(continuation)),
                        "keep_fraction": stats.get("keep_fraction"), "seconds": round(time.perf_counter() - start, 1),
                        "fetched_bytes_per_token": stats.get("retrieval_bytes", 0) / max(1, args.tokens - 1)}
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(line) + "\n")
                means.setdefault((label, keep), []).append(line)
                print(f"w{window} {label:24s} keep {keep:<5} KL {line['kl']:.4f} top-1 {line['top1']:.3f}", flush=True)
    print("mean over windows:")
    for (label, keep), lines in means.items():
        n = len(lines)
        print(f"{label:24s} keep {keep:<5} KL {sum(x['kl'] for x in lines) / n:.4f} "
              f"top-1 {sum(x['top1'] for x in lines) / n:.3f} kept {lines[0]['keep_fraction']:.4f} "
              f"fetched {sum(x['fetched_bytes_per_token'] for x in lines) / n / 1024:.0f} KiB/token (windows {n})")


if __name__ == "__main__":
    main()
