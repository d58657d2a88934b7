"""Command line: ``heterocache <command> --help``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parse_keep(text: str) -> float:
    from heterocache.budget import validate_keep

    try:
        return validate_keep(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_options(pairs: list[str] | None) -> dict:
    """``["window=32", "pooling=max"]`` -> ``{"window": 32, "pooling": "max"}`` (JSON values when they parse)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"error: --option expects NAME=VALUE, got {pair!r}")
        name, raw = pair.split("=", 1)
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def cmd_methods(args) -> int:
    from heterocache.methods.base import available_methods, method_class

    for name in available_methods():
        cls = method_class(name)
        print(f"{name:14s} {cls.description}")
        for option, default in cls.options().items():
            print(f"{'':14s}   {option} = {default!r}")
    return 0


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise SystemExit(f"error: --prompt-file {path} does not exist")
        return path.read_text()
    if sys.stdin.isatty():
        raise SystemExit("error: give a prompt with --prompt, --prompt-file or on standard input")
    return sys.stdin.read()


def cmd_generate(args) -> int:
    import torch

    import heterocache as hc
    from heterocache.models import check_prompt_length

    prompt = _read_prompt(args)
    model, tok = hc.load_model(args.model)
    if tok is None:
        raise SystemExit(f"error: model {args.model!r} has no tokenizer; use the Python API with input_ids")
    if args.chat and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    try:
        check_prompt_length(model, ids.shape[1], args.max_new_tokens)
        cache = hc.make_cache(model, args.method, args.keep, **parse_options(args.option))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    seconds = time.perf_counter() - start
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    stats = cache.stats()
    stats["generate_seconds"] = round(seconds, 3)
    print(json.dumps(stats, indent=2), file=sys.stderr if args.quiet_stats else sys.stdout)
    return 0


def cmd_demo(args) -> int:
    from heterocache.demo import run_demo

    return run_demo(methods=args.methods.split(","), keep=args.keep, out_dir=Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heterocache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list compression methods and their options")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("generate", help="generate text with a compressed cache and print cache.stats()")
    p.add_argument("--prompt")
    p.add_argument("--prompt-file")
    p.add_argument("--model", default=None, help="local HF directory or hub id (default: embedded SmolLM2-135M)")
    p.add_argument("--method", default="full")
    p.add_argument("--keep", type=_parse_keep, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--option", action="append", metavar="NAME=VALUE", help="method option (repeatable)")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="do not apply the chat template")
    p.add_argument("--quiet-stats", action="store_true", help="print stats to stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="main job on the embedded model: passkey retrieval per method")
    p.add_argument("--methods", default="full,snapkv,pyramidkv,heterocache")
    p.add_argument("--keep", type=_parse_keep, default=0.25)
    p.add_argument("--out", default="demo_out")
    p.set_defaults(func=cmd_demo)

    for module, adder in _EXTENSIONS:
        try:
            mod = __import__(module, fromlist=[adder])
        except ImportError:
            continue
        getattr(mod, adder)(sub)
    return parser


# command groups that live beside their code
_EXTENSIONS = [
    ("heterocache.profiling.cli", "add_profile_command"),
    ("heterocache.eval.cli", "add_eval_commands"),
    ("heterocache.bench", "add_bench_command"),
]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
