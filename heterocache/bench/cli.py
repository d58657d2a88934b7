"""``heterocache bench`` arguments: parsed and checked before the model loads (see bench/__init__.py)."""

from __future__ import annotations

import argparse
import sys

import heterocache.bench
from heterocache.bench.models import ARCHITECTURES
from heterocache.eval.arguments import (
    DTYPES,
    MODEL_HELP,
    at_least,
    csv,
    device,
    method_options,
    model_name,
    output_dir,
    parse_keeps,
    parse_methods,
    run_command,
)


def parse_contexts(text: str) -> list[int]:
    """``"2k,4k,7.5k,900"`` -> ``[2000, 4000, 7500, 900]`` (k = 1000 tokens)."""
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        try:
            value = float(part[:-1]) * 1000 if part.endswith("k") else float(part)
        except ValueError:
            raise ValueError(f"--context {text!r}: {part!r} is not a token count like 4000 or 7.5k") from None
        if value < 1 or value != int(value):
            raise ValueError(f"--context {text!r}: {part!r} must be a whole number of tokens >= 1")
        out.append(int(value))
    if not out:
        raise ValueError("--context needs at least one length")
    return out


def _selection(args) -> tuple[list[int], list[str], list[float], list[int], dict]:
    """Checked ``(contexts, methods with full first, keeps, batches, method options)``."""
    contexts = parse_contexts(args.context)
    methods = parse_methods(args.methods)
    keeps = parse_keeps(args.keep)
    try:
        batches = [int(b) for b in csv(args.batch)]
    except ValueError:
        raise ValueError(f"--batch {args.batch!r} must be a comma list of integers") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch {args.batch!r}: batch sizes must be >= 1")
    if not 0 <= args.length_spread < 1:
        raise ValueError(f"--length-spread {args.length_spread!r} must be in [0, 1)")
    if args.layers is not None and not args.model_config:
        raise ValueError("--layers only applies with --model-config")
    if "full" not in methods:
        print("bench: adding `full` (speedups are measured against it in the same run)")
        methods = ["full", *methods]
    return contexts, methods, keeps, batches, method_options(args.option, methods)


def _command(args) -> int:
    from heterocache.bench.run import run_bench

    return run_bench(args, *_selection(args))


def add_bench_command(subparsers) -> None:
    """Add ``bench`` to the ``heterocache`` command line."""
    p = subparsers.add_parser("bench", help="decode latency / memory / speedup vs full per method",
                              description=heterocache.bench.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", default="2k,4k,7.5k", help="prompt lengths, e.g. 2k,4k,7.5k (k = 1000)")
    p.add_argument("--methods", default="full,snapkv", help="comma list; `full` is always measured")
    p.add_argument("--keep", default="0.25", help="comma list of kept fractions for the compressed methods")
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument("--steps", type=at_least(1), default=20, help="timed decode steps (median reported)")
    p.add_argument("--warmup", type=at_least(0), default=4, help="untimed decode steps first")
    p.add_argument("--interleave", action="store_true",
                   help="prefill every method, then time their decode steps round-robin (fair on a loaded machine)")
    p.add_argument("--no-shared-prefill", action="store_true",
                   help="with --interleave: prefill every method on its own instead of one shared forward "
                        "(then prefill s is measured per method, not the shared forward less the others' compress)")
    p.add_argument("--natural-limit", action="store_true",
                   help="also time full at keep x context tokens for every keep (the natural limit, same schedule)")
    p.add_argument("--length-spread", type=float, default=0.0,
                   help="batch rows of different lengths: row i keeps context*(1 - S*i/(B-1)) tokens, left-padded "
                        "(0 <= S < 1; default 0: every row full length)")
    p.add_argument("--max-batch", action="store_true",
                   help="find the largest batch that fits per method (CUDA; doubling + bisection)")
    p.add_argument("--max-batch-limit", type=at_least(1), default=256)
    p.add_argument("--model", type=model_name, default="embedded", help=MODEL_HELP)
    p.add_argument("--model-config", choices=sorted(ARCHITECTURES), default=None,
                   help="random-weight model of that architecture (timing only; bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--layers", type=at_least(1), default=None, help="decoder layers of the --model-config model")
    p.add_argument("--device", type=device, default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: per model")
    p.add_argument("--option", action="append", metavar="[METHOD.]NAME=VALUE",
                   help="method option, e.g. heterocache.profile=profile.json (repeatable)")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="prompt ids and random weights")
    p.add_argument("--out", type=output_dir, default=None,
                   help="directory for results.jsonl/json, table.md, decode_ms.png")
    p.set_defaults(func=_command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heterocache.bench")
    add_bench_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args.func, args)
