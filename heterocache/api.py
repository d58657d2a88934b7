"""Public entry points: ``make_cache`` and argument validation."""

from __future__ import annotations

from typing import Any

from heterocache.attention import interface
from heterocache.budget import validate_keep
from heterocache.cache import HeadwiseCache
from heterocache.methods.base import build_method
from heterocache.models import model_geometry


def prepare_model(model) -> None:
    """Register heterocache's attention and switch the model to it (idempotent).

    With any other cache (e.g. ``DynamicCache``) the function is plain SDPA, so the model stays
    usable for everything else.
    """
    name = interface.register()
    if getattr(model.config, "_attn_implementation", None) != name:
        model.set_attn_implementation(name)


def make_cache(model, method: str = "full", keep: float = 1.0, *, max_buckets: int = 4,
               bucket_overhead: int = 1024, kernel: str = "auto", **options: Any) -> HeadwiseCache:
    """Build a :class:`HeadwiseCache` for ``model`` compressing with ``method`` at ``keep``.

    ``options`` are the method's dataclass fields (``heterocache methods`` lists them). Unknown
    methods / options and ``keep`` outside (0, 1] raise ``ValueError``. ``kernel``: decode
    attention backend, ``"auto"`` (the Triton paged kernel on CUDA when triton is installed, else
    batched SDPA per bucket), ``"sdpa"`` or ``"triton"``.
    """
    if kernel not in ("auto", "sdpa", "triton"):
        raise ValueError(f"kernel={kernel!r} is invalid; choose 'auto', 'sdpa' or 'triton'")
    keep = validate_keep(keep)
    instance = build_method(method, **options)
    if hasattr(instance, "bind_model"):
        instance.bind_model(model)
    geometry = model_geometry(model)
    prepare_model(model)
    cache = HeadwiseCache(
        instance, keep, geometry["n_layers"], geometry["n_kv_heads"], geometry["head_dim"],
        bucket_options={"max_buckets": max_buckets, "overhead": bucket_overhead}, geometry=geometry,
    )
    cache.model_config = model.config
    if kernel == "auto":
        from heterocache.attention.triton import triton_available

        kernel = "triton" if next(model.parameters()).device.type == "cuda" and triton_available(
            next(model.parameters()).device) else "sdpa"
    cache.kernel = kernel
    return cache

