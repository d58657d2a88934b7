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

DEFAULT_METHODS, DEFAULT_KEEP = "full,snapkv", "0.25"


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


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in csv(text)]
    except ValueError:
        raise ValueError(f"--batch {text!r} must be a comma list of integers") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch {text!r}: batch sizes must be >= 1")
    return batches


def _selection(args) -> tuple[list[int], list[str], list[float], list[int], dict]:
    """Checked ``(contexts, methods with full first, keeps, batches, method options)``."""
    contexts = parse_contexts(args.context)
    methods = parse_methods(args.methods or DEFAULT_METHODS)
    keeps = parse_keeps(args.keep or DEFAULT_KEEP)
    batches = parse_batches(args.batch)
    if not 0 <= args.length_spread < 1:
        raise ValueError(f"--length-spread {args.length_spread!r} must be in [0, 1)")
    if args.layers is not None and not args.model_config:
        raise ValueError("--layers only applies with --model-config")
    if "full" not in methods:
        print("bench: adding `full` (speedups are measured against it in the same run)")
        methods = ["full", *methods]
    return contexts, methods, keeps, batches, method_options(args.option, methods)


def parse_gpus(args) -> list:
    """The ``--project`` presets with ``--hbm-tbps`` / ``--link-gbps`` / ``--hbm-gb`` applied ([] without
    ``--project``)."""
    from heterocache.bench.roofline import GPUS, gpu

    overrides = {"--hbm-tbps": args.hbm_tbps, "--link-gbps": args.link_gbps, "--hbm-gb": args.hbm_gb}
    if args.project is None:
        given = [flag for flag, value in overrides.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} with --project GPU")
        return []
    names = csv(args.project.lower())
    names = list(GPUS) if names == ["all"] else names
    unknown = [n for n in names if n not in GPUS]
    if unknown or not names:
        raise ValueError(f"--project {args.project!r}: unknown GPU preset(s) {unknown}; choose from "
                         f"{', '.join(GPUS)} or all (comma list)")
    return [gpu(n, args.hbm_tbps, args.link_gbps, args.hbm_gb) for n in dict.fromkeys(names)]


def _share_list(text: str | None, flag: str, count: int, default: float | None,
                positive: bool = False) -> list[float | None]:
    """One value per compressed (method, keep) run of the grid, or one value for all of them; each in
    [0, 1] (``positive``: (0, 1])."""
    if text is None:
        return [default] * count
    try:
        values = [float(v) for v in csv(text)]
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be a comma list of numbers") from None
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise ValueError(f"{flag} {text!r}: give one value, or one per compressed run in --methods x --keep "
                         f"order ({count})")
    bad = [v for v in values if not (0 < v if positive else 0 <= v) or v > 1]
    if bad:
        raise ValueError(f"{flag} {text!r}: values must be in {'(0' if positive else '[0'}, 1], got {bad}")
    return values


MEASURING_FLAGS = {"interleave": "--interleave", "natural_limit": "--natural-limit", "max_batch": "--max-batch",
                   "no_shared_prefill": "--no-shared-prefill", "option": "--option", "threads": "--threads",
                   "device": "--device"}


def _plan(args, devices: list):
    """A checked projection without running (``--moved-share`` / ``--moved-share-from``)."""
    from heterocache.bench.project import Plan, explicit_shares, read_share_lines, select_share_lines

    if args.moved_share is not None and args.moved_share_from is not None:
        raise ValueError("--moved-share and --moved-share-from are two sources of the same numbers: give one")
    flag = "--moved-share" if args.moved_share is not None else "--moved-share-from"
    if not devices:
        raise ValueError(f"{flag} projects without running a model: it needs --project GPU (e.g. --project h200)")
    if not args.model_config:
        raise ValueError(f"{flag} projects without running a model: it needs --model-config "
                         f"({'|'.join(sorted(ARCHITECTURES))}), the shape to project")
    measuring = [name for attr, name in MEASURING_FLAGS.items() if getattr(args, attr)]
    if args.length_spread:
        measuring.append("--length-spread")
    if measuring:
        raise ValueError(f"{', '.join(measuring)} only appl{'y' if len(measuring) > 1 else 'ies'} to a measured run; "
                         f"{flag} runs no model")
    contexts, batches = parse_contexts(args.context), parse_batches(args.batch)
    dtype = args.dtype or "bf16"
    common = dict(devices=devices, shape=args.model_config, layers=args.layers, dtype=dtype, contexts=contexts,
                  batches=batches)
    if args.moved_share_from is not None:
        given = [f for f, v in (("--prefetched-share", args.prefetched_share), ("--kept-fraction", args.kept_fraction))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} with --moved-share "
                             "(a result directory gives its own)")
        methods = parse_methods(args.methods) if args.methods else None
        keeps = parse_keeps(args.keep) if args.keep else None
        lines = read_share_lines(args.moved_share_from)
        return Plan(**common, lines=select_share_lines(lines, methods, keeps, args.moved_share_from),
                    directory=args.moved_share_from)
    if not args.methods:
        raise ValueError("--moved-share needs --methods (and --keep): the runs whose shares it gives")
    methods = [m for m in parse_methods(args.methods) if m != "full"]
    keeps = parse_keeps(args.keep or DEFAULT_KEEP)
    runs = [(m, k) for m in methods for k in keeps]
    if not runs:
        raise ValueError("--moved-share: --methods names no compressed method (FullKV is always projected)")
    moved = _share_list(args.moved_share, "--moved-share", len(runs), None)
    prefetched = _share_list(args.prefetched_share, "--prefetched-share", len(runs), 0.0)
    kept = _share_list(args.kept_fraction, "--kept-fraction", len(runs), None, positive=True)
    over = [f"{m}@{k:g}: {r:g}" for (m, k), r in zip(runs, kept) if r is not None and r > k]
    if over:
        raise ValueError(f"--kept-fraction cannot exceed the run's keep ({', '.join(over)})")
    picks = [(m, k, explicit_shares(k, c, p, r)) for (m, k), c, p, r in zip(runs, moved, prefetched, kept)]
    return Plan(**common, picks=picks)


def _command(args) -> int:
    devices = parse_gpus(args)
    if args.moved_share is not None or args.moved_share_from is not None:
        from heterocache.bench.project import run_projection

        return run_projection(_plan(args, devices), args.out)
    for flag, value in (("--prefetched-share", args.prefetched_share), ("--kept-fraction", args.kept_fraction)):
        if value is not None:
            raise ValueError(f"{flag} only applies with --moved-share (a projection without running)")
    from heterocache.bench.run import run_bench

    return run_bench(args, *_selection(args), devices=devices)


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_bench_command(subparsers) -> None:
    """Add ``bench`` to the ``heterocache`` command line."""
    p = subparsers.add_parser("bench", help="decode latency / memory / speedup vs full per method",
                              description=heterocache.bench.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", default="2k,4k,7.5k", help="prompt lengths, e.g. 2k,4k,7.5k (k = 1000)")
    p.add_argument("--methods", default=None,
                   help=f"comma list; `full` is always measured (default {DEFAULT_METHODS}; with --moved-share-from: "
                        "every method of DIR)")
    p.add_argument("--keep", default=None, help=f"comma list of kept fractions for the compressed methods (default "
                                                f"{DEFAULT_KEEP}; with --moved-share-from: every keep of DIR)")
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
    p.add_argument("--prompt", choices=("essays", "random"), default=None,
                   help="prompt tokens: essays (the PEERS essay text; default with --model, as retrieval depends on "
                        "real attention) or random ids (default with --model-config)")
    p.add_argument("--seed", type=int, default=0, help="prompt ids and random weights")
    p.add_argument("--out", type=output_dir, default=None,
                   help="directory for results.jsonl/json, table.md, decode_ms.png (a projection without running: "
                        "projection.json, projection.md)")
    g = p.add_argument_group("projected GPU decode step (roofline: heterocache/bench/roofline.py)")
    g.add_argument("--project", metavar="GPU[,GPU]", default=None,
                   help="project every measured line onto these GPUs: h200, h100 (SXM), a100 (80GB SXM) or all")
    g.add_argument("--hbm-tbps", type=positive_float, default=None, help="override the presets' HBM bandwidth (TB/s)")
    g.add_argument("--link-gbps", type=positive_float, default=None,
                   help="override the presets' usable host-link bandwidth (GB/s; presets: 55 PCIe Gen5, 25 Gen4)")
    g.add_argument("--hbm-gb", type=positive_float, default=None, help="override the presets' HBM capacity (GB)")
    g.add_argument("--moved-share-from", metavar="DIR", default=None,
                   help="project --model-config at --context / --batch without running, each method's shares (kept, "
                        "moved per token) from the bench results in DIR at the nearest context")
    g.add_argument("--moved-share", metavar="S[,S]", default=None,
                   help="the same with given shares: slow-tier bytes an attention waits for per decode token / full KV "
                        "of the context, one value or one per compressed run (--methods x --keep order)")
    g.add_argument("--prefetched-share", metavar="S[,S]", default=None,
                   help="with --moved-share: prefetched bytes per token / full KV (default 0)")
    g.add_argument("--kept-fraction", metavar="R[,R]", default=None,
                   help="with --moved-share: kept fraction of the tokens (default: keep; the index costs keep - R)")
    p.set_defaults(func=_command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heterocache.bench")
    add_bench_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args.func, args)
