"""Method protocol and registry.

A compression method is a small ``@dataclass`` registered by name. At the end of each layer's
prefill the cache calls ``method.select(ctx)`` with a :class:`PrefillContext` and stores exactly
the tokens of the returned boolean mask. Optional ``on_decode_step(ctx)`` runs after every decode
attention of a layer (H2O-style eviction, HeteroCache drift checks). State lives on the cache
(``ctx.state``, a dict private to the method), never in globals.

Budget accounting (docs/DESIGN.md section 2): over all layers x KV heads the kept prompt entries
sum to ``round(keep * prompt_len * n_layers * n_kv_heads)`` per batch row; ``budget.py`` turns
``keep`` into per-layer / per-head budgets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from heterocache.cache import HeadwiseLayer

_REGISTRY: dict[str, type[Method]] = {}


@dataclass
class PrefillContext:
    """What a method sees for one layer at the end of prefill.

    Shapes: ``queries (B, Hq, T, D)``, ``keys``/``values`` ``(B, Hkv, T, D)`` (post-RoPE, exactly
    what attention used), ``valid (B, T)`` bool (False on left padding), ``prompt_lengths (B,)``
    = ``valid.sum(-1)``. Query head ``j`` reads KV head ``j // group``.
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
    state: dict[str, Any]
    cache: Any = None  # the HeadwiseCache; cross-layer methods (CAKE) reach earlier layers through it
    module: Any = None  # the attention module (for sliding_window etc.)

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


@dataclass
class DecodeContext:
    """What ``on_decode_step`` sees after a decode attention of one layer.

    ``queries (B, Hq, q, D)`` are the new post-RoPE queries; ``layer`` gives access to the stored
    tokens (``layer.padded()`` and ``layer.restrict(mask)``); ``step`` counts decode forwards of this
    layer since prefill, starting at 1.
    """

    layer_idx: int
    n_layers: int
    queries: torch.Tensor
    layer: HeadwiseLayer
    step: int
    scaling: float
    keep: float
    state: dict[str, Any]
    cache: Any = None


class Method:
    """Base class: subclasses are dataclasses with their options as fields."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        """Return a bool mask ``(B, Hkv, T)`` of the prompt tokens to keep (never padding)."""
        raise NotImplementedError

    @property
    def needs_decode_hook(self) -> bool:
        """Whether the cache must call ``on_decode_step``: by default, when a subclass defines it.

        Methods whose hook only matters for some options (e.g. decode eviction) override this.
        """
        return type(self).on_decode_step is not Method.on_decode_step

    def on_decode_step(self, ctx: DecodeContext) -> None:  # pragma: no cover - default no-op
        return None

    def setup(self, cache: Any) -> None:
        """Called once when the cache is created (validate options against the model here)."""
        return None

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


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method dataclass under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered method names, FullKV first."""
    _load_builtin()
    names = sorted(n for n in _REGISTRY if not n.startswith("_"))  # "_name": private (tests)
    if "full" in names:
        names.remove("full")
        names.insert(0, "full")
    return names


def method_class(name: str) -> type[Method]:
    _load_builtin()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"method={name!r} is not a registered method; choose one of {available_methods()}")
    return _REGISTRY[name]


def build_method(name: str, **options: Any) -> Method:
    """Instantiate method ``name`` with ``options``; unknown options raise a ValueError listing valid ones."""
    cls = method_class(name)
    valid = cls.options()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {name!r}; valid options: {sorted(valid) or 'none'}"
        )
    return cls(**options)


def _load_builtin() -> None:
    # Import for the registration side effect; the package imports every method module.
    import heterocache.methods  # noqa: F401

