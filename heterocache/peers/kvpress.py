"""kvpress (NVIDIA, 0.5.5) presses as peer methods: names, validation and construction.

A peer method is named ``kvpress:PRESS`` (``kvpress:snapkv``) or ``kvpress:WRAPPER+PRESS``
(``kvpress:adakv+expected_attention``: the wrapper's head-wise budget over the press's scores).
``keep`` maps to kvpress's ``compression_ratio = 1 - keep``. Options go to the press, or to the
wrapper when they are the wrapper's (``alpha_safeguard``). kvpress is imported only here, lazily:
importing it patches every registered attention function (its head-wise masking), so a process that
never builds a peer is never touched.

Left out on purpose: presses that download weights or statistics from a hub (DuoAttention, QFilter,
KVzap), need a tokenizer and extra passes (KVzip), or re-rotate the kept keys (KeyRerotation: the
decode positions would then be the kept count, not the absolute position this harness uses).
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any

from heterocache.budget import validate_keep

PREFIX = "kvpress:"

#: our name -> kvpress class name, for presses that score tokens and drop the lowest
PRESSES = {
    "snapkv": "SnapKVPress",
    "pyramidkv": "PyramidKVPress",
    "streamingllm": "StreamingLLMPress",
    "tova": "TOVAPress",
    "knorm": "KnormPress",
    "expected_attention": "ExpectedAttentionPress",
    "keydiff": "KeyDiffPress",
    "lagkv": "LagKVPress",
    "random": "RandomPress",
}
#: wrappers of a scoring press; those in MASKING mask the evicted entries instead of freeing them
WRAPPERS = {"adakv": "AdaKVPress", "criticalkv": "CriticalKVPress", "criticaladakv": "CriticalAdaKVPress"}
MASKING = frozenset({"adakv", "criticaladakv"})

INSTALL_HINT = 'pip install -e ".[peers]" (or `make peers`, which builds .venv-peers with transformers 5.2)'


def kvpress_available() -> bool:
    """True when kvpress can be imported (checked without importing it)."""
    return importlib.util.find_spec("kvpress") is not None


def import_kvpress():
    """The kvpress module, or an ImportError naming the extra that installs it."""
    try:
        import kvpress
    except ImportError as error:
        raise ImportError(f"the kvpress peer methods need kvpress 0.5.5: {INSTALL_HINT} "
                          f"(importing it failed: {error})") from error
    return kvpress


def peer_method_names() -> list[str]:
    """Every valid peer name: each press, and each wrapper around each press."""
    names = [PREFIX + press for press in PRESSES]
    names += [f"{PREFIX}{wrapper}+{press}" for wrapper in WRAPPERS for press in PRESSES]
    return names


def available_peer_methods() -> list[str]:
    """The peer method names when kvpress is importable, else ``[]``."""
    return peer_method_names() if kvpress_available() else []


def is_peer_method(name: str) -> bool:
    """True for names in the ``kvpress:`` namespace (valid or not: :func:`parse_peer_name` checks)."""
    return name.startswith(PREFIX)


@dataclass(frozen=True)
class PeerSpec:
    """A parsed peer name: ``press`` (a key of PRESSES) and an optional ``wrapper`` (a key of WRAPPERS)."""

    name: str
    press: str
    wrapper: str | None

    @property
    def masks(self) -> bool:
        """True when the evicted entries stay in memory, masked at attention time."""
        return self.wrapper in MASKING


def parse_peer_name(name: str) -> PeerSpec:
    """``"kvpress:adakv+snapkv"`` -> ``PeerSpec(press="snapkv", wrapper="adakv")``; ValueError otherwise."""
    body = name[len(PREFIX):] if name.startswith(PREFIX) else None
    parts = body.split("+") if body else []
    wrapper, press = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if len(parts) == 1 else "")
    if press not in PRESSES or (wrapper is not None and wrapper not in WRAPPERS):
        raise ValueError(
            f"unknown peer method {name!r}; valid: {', '.join(PREFIX + p for p in PRESSES)}, "
            f"or {PREFIX}WRAPPER+PRESS with WRAPPER in {', '.join(WRAPPERS)}"
        )
    return PeerSpec(name, press, wrapper)


def _parameters(cls) -> list[str]:
    return [p for p in inspect.signature(cls).parameters if p not in ("compression_ratio", "press")]


def build_press(name: str, keep: float, **options: Any):
    """The kvpress press for peer ``name`` at ``keep`` (``compression_ratio = 1 - keep``).

    ``options`` are the press's constructor arguments (``window_size``, ``kernel_size``, ``n_sink``,
    ...) or the wrapper's (``alpha_safeguard``); unknown ones raise ValueError listing the valid ones.
    """
    spec = parse_peer_name(name)
    keep = validate_keep(keep)
    kvpress = import_kvpress()
    press_cls = getattr(kvpress, PRESSES[spec.press])
    wrapper_cls = getattr(kvpress, WRAPPERS[spec.wrapper]) if spec.wrapper else None
    press_params = _parameters(press_cls)
    wrapper_params = _parameters(wrapper_cls) if wrapper_cls else []
    unknown = sorted(set(options) - set(press_params) - set(wrapper_params))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {name!r}; valid: {sorted(press_params + wrapper_params)}"
                         " (the budget is set by keep, not compression_ratio)")
    press = press_cls(compression_ratio=1.0 - keep, **{k: v for k, v in options.items() if k in press_params})
    if wrapper_cls is None:
        return press
    return wrapper_cls(press=press, **{k: v for k, v in options.items() if k in wrapper_params})
