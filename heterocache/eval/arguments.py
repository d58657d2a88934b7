"""Command-line argument checks shared by every ``heterocache`` subcommand.

Every subcommand checks its arguments (paths, numbers, method names, method options) before it
loads a model. A user error ends the command as ``error: MESSAGE`` on stderr with exit code 2 and
no traceback: argparse ``type=`` functions below raise ``ArgumentTypeError``; later checks raise
``ValueError`` / ``FileNotFoundError``, which :func:`run_command` turns into a :class:`UsageError`.

Method options use one syntax everywhere: ``--option [METHOD.]NAME=VALUE`` (VALUE parsed as JSON
when it parses, else kept as a string). Without ``METHOD.`` the option goes to every selected
method that has it. ``METHOD`` is split off at the last ``.`` before ``=``, so method names may
contain ``:`` (peer methods such as ``kvpress:snapkv``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

MODEL_HELP = ("the embedded SmolLM2-135M (default), a .gguf file, qwen2.5-coder-0.5b (`make long-model`), a local "
              "HF directory or a hub id")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # what models.load_model accepts


class UsageError(SystemExit):
    """A user error: exit code 2; ``str()`` is the message (printed once, as ``error: MESSAGE``)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a subcommand handler; a user error is printed as ``error: ...`` and raised as UsageError."""
    try:
        return int(func(args) or 0)
    except UsageError as err:
        error = err
    except (ValueError, FileNotFoundError) as err:
        error = UsageError(str(err))
    print(f"error: {error}", file=sys.stderr)
    raise error from None


# ---- argparse types: a bad value is an argparse error naming the flag --------------------------

def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def keep_fraction(text: str) -> float:
    """argparse type: a kept fraction in (0, 1]."""
    from heterocache.budget import validate_keep

    try:
        return validate_keep(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def input_dir(text: str) -> str:
    """argparse type: an existing directory."""
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def output_dir(text: str) -> str:
    """argparse type: a directory that exists and is writable, or can be created."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    _check_creatable(path, text)
    return text


def output_file(text: str) -> str:
    """argparse type: a file path that can be written (its folders are created if missing)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    _check_creatable(path.parent, text)
    return text


def _check_creatable(path: Path, text: str) -> None:
    ancestor = path if path.exists() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: {ancestor} is not writable")


def model_name(text: str) -> str:
    """argparse type of ``--model``: checked without loading weights (models.check_model_name).

    A ``.gguf`` file must exist and be a readable GGUF file of an architecture transformers can
    dequantise; ``qwen2.5-coder-0.5b`` must be installed (``make long-model``); a local path must
    exist; the embedded model and hub ids pass.
    """
    from heterocache.models import check_model_name

    try:
        check_model_name(text)
    except (ValueError, FileNotFoundError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def device(text: str) -> str:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:i`` (a GPU only if one is visible)."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:0, ...)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available")
    return text


# ---- comma lists and method options: ValueError naming the flag ---------------------------------

def csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_methods(text: str, flag: str = "--methods") -> list[str]:
    """Comma list of registered method names (``NAME@VARIANT``: the method NAME under its own label, see
    ``eval.grid.base_method``) and peer methods (``kvpress:PRESS``, needs the peers extra)."""
    from heterocache.eval.grid import base_method
    from heterocache.methods.base import available_methods
    from heterocache.peers.kvpress import INSTALL_HINT, is_peer_method, kvpress_available, parse_peer_name

    methods = csv(text)
    if len(set(methods)) != len(methods):
        raise ValueError(f"{flag}: a method is listed twice ({text}); give variants their own labels, METHOD@NAME")
    unknown = [m for m in methods if base_method(m) not in available_methods() and not is_peer_method(m)]
    if unknown or not methods:
        raise ValueError(f"{flag}: unknown method(s) {unknown}; available methods: {', '.join(available_methods())}"
                         " and the kvpress:PRESS peers (`heterocache methods` lists them)")
    for method in filter(is_peer_method, methods):
        parse_peer_name(method)  # ValueError listing the valid peer names
        if not kvpress_available():
            raise ValueError(f"{flag}: {method} is a kvpress peer method and kvpress is not installed: {INSTALL_HINT}")
    return methods


def parse_keeps(text: str, flag: str = "--keep") -> list[float]:
    """Comma list of kept fractions in (0, 1]."""
    from heterocache.budget import validate_keep

    keeps = [validate_keep(k) for k in csv(text)]
    if not keeps:
        raise ValueError(f"{flag} needs at least one kept fraction")
    return keeps


def parse_options(pairs: list[str] | None) -> dict:
    """``["window=32", "snapkv.pooling=max"]`` -> ``{"window": 32, "snapkv.pooling": "max"}``."""
    out = {}
    for pair in pairs or []:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--option expects [METHOD.]NAME=VALUE, got {pair!r}")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def method_options(pairs: list[str] | None, methods: list[str]) -> dict[str, dict]:
    """``--option`` values per selected method, each checked by ``build_method`` (unknown option,
    bad type or range: ValueError) and, for a ``profile`` path, by the file's existence."""
    from heterocache.eval.grid import base_method
    from heterocache.methods.base import build_method, method_class
    from heterocache.peers.kvpress import build_press, is_peer_method

    out: dict[str, dict] = {m: {} for m in methods}
    for name, value in parse_options(pairs).items():
        target, _, option = name.rpartition(".")
        ours = [m for m in methods if not is_peer_method(m)]  # a peer's options are always named METHOD.NAME
        owners = [target] if target else [m for m in ours if option in method_class(base_method(m)).options()]
        if not owners or (target and target not in methods):
            raise ValueError(f"--option {name}: no selected method ({', '.join(methods)}) takes it")
        for method in owners:
            out[method][option] = value
    for method, options in out.items():
        if is_peer_method(method):
            build_press(method, 0.5, **options)
            continue
        build_method(base_method(method), **options)
        profile = options.get("profile")
        if isinstance(profile, str) and not Path(profile).expanduser().is_file():
            raise FileNotFoundError(f"--option {method}.profile={profile}: no such file")
    return {m: opts for m, opts in out.items() if opts}
