"""Command line: ``heterocache <command> --help``.

Every command checks its arguments before it loads a model; a user error prints ``error: ...`` on
stderr and exits with code 2 (eval/arguments.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from heterocache.eval.arguments import (
    DTYPES,
    MODEL_HELP,
    UsageError,
    at_least,
    keep_fraction,
    method_options,
    model_name,
    output_dir,
    parse_methods,
    run_command,
)


def cmd_methods(args) -> int:
    from heterocache.methods.base import available_methods, method_class

    for name in available_methods():
        cls = method_class(name)
        print(f"{name:14s} {cls.description}")
        for option, default in cls.options().items():
            print(f"{'':14s}   {option} = {default!r}")
    from heterocache.peers.kvpress import INSTALL_HINT, available_peer_methods

    peers = available_peer_methods()
    if peers:
        print("\npeer methods (kvpress, run in this harness; options are the press's, --option NAME.OPTION=V):\n  "
              + "\n  ".join(peers))
    else:
        print(f"\npeer methods (kvpress:PRESS): not installed; {INSTALL_HINT}")
    return 0


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"--prompt-file {path} does not exist")
        return path.read_text()
    if sys.stdin.isatty():
        raise UsageError("give a prompt with --prompt, --prompt-file or on standard input")
    return sys.stdin.read()


def cmd_generate(args) -> int:
    import torch

    import heterocache as hc
    from heterocache.hf import cache_kwargs
    from heterocache.models import check_prompt_length

    method = parse_methods(args.method, "--method")
    if len(method) != 1:
        raise UsageError(f"--method takes one method name, got {args.method!r}")
    options = method_options(args.option, method).get(method[0], {})
    prompt = _read_prompt(args)
    model, tok = hc.load_model(args.model)
    if tok is None:
        raise UsageError(f"model {args.model!r} has no tokenizer; use the Python API with input_ids")
    if args.chat and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    check_prompt_length(model, ids.shape[1], args.max_new_tokens)
    cache = hc.make_cache(model, method[0], args.keep, **options)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache, model),
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
    from heterocache.peers.kvpress import kvpress_available

    default = "full,snapkv,heterocache" + (",kvpress:expected_attention" if kvpress_available() else "")
    return run_demo(methods=parse_methods(args.methods or default), keep=args.keep, out_dir=Path(args.out), length=args.length,
                    question_mode=args.question_mode, dtype=args.dtype)


def build_parser() -> argparse.ArgumentParser:
    # command groups that live beside their code; imported here, so a broken one fails loudly
    from heterocache.bench.cli import add_bench_command
    from heterocache.eval.cli import add_eval_commands
    from heterocache.profiling.cli import add_profile_command
    from heterocache.store.cli import add_model_command

    parser = argparse.ArgumentParser(prog="heterocache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list compression methods and their options")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("generate", help="generate text with a compressed cache and print cache.stats()")
    p.add_argument("--prompt")
    p.add_argument("--prompt-file")
    p.add_argument("--model", type=model_name, default=None, help=MODEL_HELP)
    p.add_argument("--method", default="full")
    p.add_argument("--keep", type=keep_fraction, default=1.0)
    p.add_argument("--max-new-tokens", type=at_least(1), default=64)
    p.add_argument("--option", action="append", metavar="NAME=VALUE", help="method option (repeatable)")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="do not apply the chat template")
    p.add_argument("--quiet-stats", action="store_true", help="print stats to stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="main job on the embedded model: passkey retrieval per method")
    p.add_argument("--methods", default=None, help="default: full,snapkv,heterocache (+ kvpress:expected_attention "
                   "when kvpress is installed)")
    p.add_argument("--keep", type=keep_fraction, default=0.25)
    p.add_argument("--question-mode", choices=("decode", "prefill"), default="decode",
                   help="decode (default): ask the question after compression; prefill: inside the compressed prompt")
    p.add_argument("--length", type=at_least(100), default=3000, help="haystack tokens (default 3000)")
    p.add_argument("--out", type=output_dir, default="demo_out")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="float32 (default; measured: on this 135M model at 3,000 tokens bf16 answers 2/3 pass keys "
                        "with heterocache instead of 3/3, and transformers' bf16 GQA decode of FullKV runs ~10x "
                        "slower on the CPU), or auto: bf16 where the CPU has AMX / AVX-512 bf16 or on CUDA")
    p.set_defaults(func=cmd_demo)

    add_profile_command(sub)
    add_eval_commands(sub)
    add_bench_command(sub)
    add_model_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
