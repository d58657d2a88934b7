"""Method protocol and registry.

A compression method is a small ``@dataclass`` with its options as fields. The cache drives it
(docs/DESIGN.md s.4, the decode step in s.3); every hook below has a no-op default, and the cache
calls each of them at its fixed place:

- ``bind_model(model)`` once in ``make_cache`` (resolve model-dependent options, e.g. a profile);
- ``setup(cache)`` when the cache is created and after every ``reset()``;
- ``budgets(keep, prompt_len, n_layers, n_kv_heads)`` once per prefill (the cache turns it into
  ``ctx.budget``, the per-layer ``(B, Hkv)`` kept prompt tokens);
- ``select(ctx)`` at the end of each layer's prefill: the bool mask of prompt tokens to keep;
- ``after_store(layer)`` once the layer has stored them (e.g. lay out storage for the decode steps);
- ``before_decode_attention(layer, queries)`` and ``on_decode_step(ctx)`` around each decode attention of
  a layer (never called at ``keep=1.0``, which is FullKV during decode too);
- ``on_batch_select(layer, indices)`` / ``on_crop(layer, length)`` before ``generate`` reorders batch rows
  (beam search) or drops the newest tokens (assisted decoding), likewise not at ``keep=1.0``;
- ``stats()`` merged into ``cache.stats()``; ``close()`` on ``cache.close()`` / ``reset()``.

Per-cache state lives on the method instance (``make_cache`` builds one instance per cache) and is
(re)initialised in ``setup``; never in globals.

Budget accounting (docs/DESIGN.md section 2): over all layers x KV heads the kept prompt entries
sum to ``round(keep * prompt_len * n_layers * n_kv_heads)`` per batch row. On hybrid models the
cache caps sliding-window layers at the ``min(prompt_len, W - 1)`` tokens they can still attend to
and moves the excess to full-attention heads; methods see it in ``ctx.budget`` and ``ctx.valid``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from heterocache.budget import uniform_budgets


class LayerView(Protocol):
    """What a method may use of one layer's storage (``cache.HeadwiseLayer`` is the implementation).

    Sequences are ``b * n_kv_heads + h``; the storage is a list of ``buckets``
    (``attention.ragged.Bucket``) and ``locate[seq] = (bucket, row)``; ``version`` changes whenever
    the layout changes (a method that addresses storage slots maps them again).
    """

    layer_idx: int
    seen: int  # tokens seen (positions), not tokens kept
    prefill_len: int
    batch: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    version: int
    buckets: list
    locate: list

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``keys, values (B, Hkv, L, D)``, ``positions (B, Hkv, L)`` (-1 on padding), ``lengths (B, Hkv)``."""

    def restrict(self, keep: torch.Tensor) -> None:
        """Keep the ``keep (B, Hkv, L)`` entries of the ``padded()`` layout."""

    def prefix(self, seq_ids: list[int], length: int) -> torch.Tensor:
        """Keys of the first ``length`` slots of the given sequences ``(n, length, D)``."""

    def overwrite_prefix(self, seq_ids: list[int], keys: torch.Tensor, values: torch.Tensor,
                         positions: torch.Tensor, counts: list[int]) -> None:
        """Replace the first ``counts[i]`` slots of sequence ``seq_ids[i]``."""

    def write_slots(self, seq_ids: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    positions: torch.Tensor) -> None:
        """Overwrite storage slot ``slots[i]`` of sequence ``seq_ids[i]``."""

    def kept_prompt_tokens(self) -> torch.Tensor:
        """``(B, Hkv)`` stored tokens with a position below the prefill length."""


@dataclass
class PrefillContext:
    """What a method sees for one layer at the end of prefill.

    Shapes: ``queries (B, Hq, T, D)``, ``keys``/``values`` ``(B, Hkv, T, D)`` (post-RoPE, exactly
    what attention used), ``valid (B, T)`` bool: the prompt slots this layer may keep (False on left
    padding and, on a sliding-window layer, on all but the last ``W - 1`` slots, which no later query
    can see), ``prompt_lengths (B,)`` real prompt lengths (padding excluded), ``budget (B, Hkv)``
    long: this layer's kept prompt tokens per head from :meth:`Method.budgets` (sliding layers capped
    at ``min(T_b, W - 1)``). ``window``: this layer's sliding window or None; ``layer_windows``: every
    layer's (cross-layer methods). Query head ``j`` reads KV head ``j // group``.
    """

    layer_idx: int
    n_layers: int
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    prompt_lengths: torch.Tensor
    scaling: float
    keep: float
    budget: torch.Tensor
    layers: Any = None  # the cache's layers; cross-layer methods (CAKE) re-evict earlier ones
    module: Any = None  # the attention module
    window: int | None = None  # sliding window W of this layer, None: full attention
    layer_windows: list[int | None] | None = None  # every layer's window (None: all full attention)

    @property
    def group(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def seq_len(self) -> int:
        return self.keys.shape[2]

    def keep_all(self) -> torch.Tensor:
        """Mask ``(B, Hkv, T)`` keeping every valid (non-padding) token."""
        return self.valid[:, None, :].expand(-1, self.n_kv_heads, -1).clone()

    def keeps_everything(self) -> bool:
        """True when every head's budget covers every keepable token (``keep=1.0``): scoring can be skipped."""
        return bool((self.budget >= self.valid.sum(-1)[:, None]).all())


@dataclass
class DecodeContext:
    """What ``on_decode_step`` sees after a decode attention of one layer.

    ``queries (B, Hq, q, D)`` are the new post-RoPE queries; ``layer`` gives access to the stored
    tokens (``layer.padded()`` and ``layer.restrict(mask)``); ``step`` counts decode forwards of this
    layer since prefill, starting at 1; ``budget (B, Hkv)`` is the layer's prompt budget.
    Sliding-window layers: see :meth:`reachable` (methods that evict drop what it excludes).
    """

    layer_idx: int
    n_layers: int
    queries: torch.Tensor
    layer: LayerView
    step: int
    scaling: float
    keep: float
    budget: torch.Tensor
    window: int | None = None  # sliding window W of this layer, None: full attention

    def reachable(self, positions: torch.Tensor) -> torch.Tensor:
        """Stored slots a later query can still attend to: ``positions >= 0`` and, on a sliding-window
        layer, ``position > seen - W`` (the next query sits at position ``layer.seen``). Same shape as
        ``positions``."""
        live = positions >= 0
        if self.window is not None:
            live = live & (positions > self.layer.seen - self.window)
        return live


class Method:
    """Base class: subclasses are dataclasses with their options as fields (see module docstring)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def budgets(self, keep: float, prompt_len: int, n_layers: int, n_kv_heads: int) -> list[list[int]]:
        """Kept prompt tokens per ``[layer][kv_head]`` for one prompt length (default: uniform)."""
        return uniform_budgets(keep, prompt_len, n_layers, n_kv_heads)

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        """Return a bool mask ``(B, Hkv, T)`` of the prompt tokens to keep (never padding)."""
        raise NotImplementedError

    def validate(self) -> None:
        """Check option ranges and choices (types are checked from the annotations); raise ValueError."""

    def bind_model(self, model) -> None:
        """Called once by ``make_cache`` with the model (resolve model-dependent options)."""

    def setup(self, cache: Any) -> None:
        """Called when the cache is created and after each reset: (re)initialise per-cache state."""

    def after_store(self, layer: LayerView) -> None:
        """Called after ``layer`` stored the tokens ``select`` kept (end of its prefill)."""

    def before_decode_attention(self, layer: LayerView, queries: torch.Tensor) -> None:
        """Called before each decode attention of ``layer`` (apply work finished in the background)."""

    def on_decode_step(self, ctx: DecodeContext) -> None:
        """Called after each decode attention of a layer (decode-time eviction, drift checks)."""

    def on_batch_select(self, layer: LayerView, indices: torch.Tensor) -> None:
        """Called before ``layer`` keeps batch rows ``indices (B',)`` in that order (beam search's reorder,
        ``batch_select_indices``, ``batch_repeat_interleave``): per-row state of the layer follows."""

    def on_crop(self, layer: LayerView, length: int) -> None:
        """Called before ``layer`` drops every stored token at position ``>= length`` (assisted decoding
        rejecting draft tokens; they may be prompt tokens): state that refers to them follows. A
        method that cannot serve this raises ``ValueError`` naming the option."""

    def stats(self) -> dict[str, Any]:
        """Extra statistics; ``device_bytes``/``host_bytes``/``disk_bytes`` add to the cache's own."""
        return {}

    def close(self) -> None:
        """Stop background work and free slow-tier copies."""

    @classmethod
    def options(cls) -> dict[str, Any]:
        """Option names and defaults."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
            else:
                out[f.name] = None
        return out


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise ``ValueError`` naming option ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is invalid; choose one of {list(choices)}")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """Raise ``ValueError`` naming option ``name`` unless ``low <= value <= high`` (``low < value`` if open)."""
    bad = (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high)
    if bad or (isinstance(value, float) and math.isnan(value)):
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        raise ValueError(f"{name}={value!r} must be in {'(' if low_open else '['}{lo}, {hi}]")


_SIMPLE_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_types(cls: type[Method], options: dict[str, Any]) -> None:
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in options.items():
        hint = hints.get(name)
        hint = hint if isinstance(hint, str) else getattr(hint, "__name__", "")
        allowed = _SIMPLE_TYPES.get(hint)
        if allowed is None:
            continue  # Any / unions: the method's validate() checks them
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed)
        if not ok:
            raise ValueError(f"option {name}={value!r} of method {cls.name!r} must be of type {hint}")


# Built-in methods by name (explicit: no scanning of the package); imported on first use.
_BUILTIN: dict[str, str] = {
    "full": "heterocache.methods.full:Full",
    "streamingllm": "heterocache.methods.streamingllm:StreamingLLM",
    "h2o": "heterocache.methods.h2o:H2O",
    "snapkv": "heterocache.methods.snapkv:SnapKV",
    "pyramidkv": "heterocache.methods.pyramidkv:PyramidKV",
    "cake": "heterocache.methods.cake:CAKE",
    "tova": "heterocache.methods.tova:TOVA",
    "heterocache": "heterocache.methods.heterocache:HeteroCache",
    "quest": "heterocache.methods.quest:Quest",
    "omnikv": "heterocache.methods.omnikv:OmniKV",
    "shadowkv": "heterocache.methods.shadowkv:ShadowKV",
}
_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a user method dataclass under ``cls.name`` (names starting with
    ``_`` are private: usable but not listed)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Method names: the built-ins (FullKV first), then registered ones."""
    extra = sorted(n for n in _REGISTRY if n not in _BUILTIN and not n.startswith("_"))
    return [*_BUILTIN, *extra]


def method_class(name: str) -> type[Method]:
    if isinstance(name, str) and name in _BUILTIN and name not in _REGISTRY:
        module, _, attr = _BUILTIN[name].partition(":")
        _REGISTRY[name] = getattr(importlib.import_module(module), attr)
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"method={name!r} is not a registered method; choose one of {available_methods()}")
    return _REGISTRY[name]


def build_method(name: str, **options: Any) -> Method:
    """Instantiate method ``name`` with ``options``, validated: unknown names, wrong types and values
    out of range raise a ``ValueError`` naming the option and what is allowed."""
    cls = method_class(name)
    valid = cls.options()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {name!r}; valid options: {sorted(valid) or 'none'}"
        )
    _check_types(cls, options)
    instance = cls(**options)
    instance.validate()
    return instance


__all__ = [
    "DecodeContext", "LayerView", "Method", "PrefillContext", "available_methods", "build_method", "check_choice",
    "check_range", "method_class", "register",
]
