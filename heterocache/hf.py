"""The transformers glue: ``make_cache`` and the registered attention (``attn_implementation="heterocache"``).

Prefill (first forward into an empty :class:`~heterocache.cache.HeadwiseCache`): exact causal
attention over the full keys/values with transformers' own SDPA path (so FullKV is bit-identical),
then ``cache.compress`` lets the method select what each KV head keeps. Decode: the new tokens were
already appended by ``update()``; ``cache.decode`` attends over each head's ragged kept set. Given
plain tensors (e.g. a ``DynamicCache``), the function is exactly SDPA. Given a ``FanoutKV`` (one prefill
filling several caches, heterocache/fanout.py), the same SDPA runs once, then every child compresses.
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from heterocache.attention import BACKENDS
from heterocache.budget import validate_keep
from heterocache.cache import HeadwiseCache, PendingKV
from heterocache.fanout import FanoutKV
from heterocache.methods.base import build_method
from heterocache.models import effective_window, layer_windows, model_geometry

NAME = "heterocache"


def valid_from_mask(attention_mask, batch: int, length: int, device) -> torch.Tensor:
    """``(B, T)`` bool: False for padding keys, read off the mask diagonal (works with sliding windows)."""
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return torch.ones((batch, length), dtype=torch.bool, device=device)
    diag = torch.diagonal(attention_mask[:, 0, -length:, -length:], dim1=-2, dim2=-1)
    if diag.dtype == torch.bool:
        return diag.clone()
    return diag > torch.finfo(diag.dtype).min / 2


def headwise_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """``query (B, Hq, q, D)`` -> ``(attn_output (B, q, Hq, D), None)``.

    The parameter order is transformers' own (``dropout`` before ``scaling``): wrappers such as
    kvpress's attention patch pass ``dropout`` positionally. Plain tensors (another cache) go to the
    registered ``"sdpa"`` entry, so a patch applied there (kvpress's head-wise masking) still applies.
    """
    if not isinstance(key, PendingKV | FanoutKV):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask,
                                               dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if isinstance(key, FanoutKV) or key.prefill:
        layers = key.layers if isinstance(key, FanoutKV) else [key.layer]
        return _prefill(module, query, key.keys, key.values, layers, attention_mask, dropout, scaling, kwargs), None
    return key.layer.cache.decode(key.layer, query, scaling), None


def _prefill(module, query, keys, values, layers, attention_mask, dropout, scaling, kwargs) -> torch.Tensor:
    """Exact SDPA of ``query (B, Hq, T, D)`` over ``keys/values (B, Hkv, T, D)`` -> ``(B, T, Hq, D)``, then
    ``compress`` of every layer in ``layers`` (one cache's, or one per fan-out child) on the same
    inputs; each cache's ``compress_s`` gains the seconds its own call took."""
    for layer in layers:
        _check_window(layer, kwargs.get("sliding_window"))
    out, _ = sdpa_attention_forward(module, query, keys, values, attention_mask,
                                    scaling=scaling, dropout=dropout, **kwargs)
    b, _, length, _ = keys.shape
    valid = valid_from_mask(attention_mask, b, length, keys.device)
    for layer in layers:
        start = _clock(keys.device)
        layer.cache.compress(layer, module, query, keys, values, valid, scaling)
        layer.cache.compress_s += _clock(keys.device) - start
    return out


def _clock(device: torch.device) -> float:
    """``time.perf_counter()``, after the device's queued work on CUDA (so a compress is timed alone)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _check_window(layer, sliding_window: int | None) -> None:
    """The layer's attention must slide exactly as the cache assumed when it sized rings and budgets."""
    if effective_window(sliding_window, layer.cache.model_geometry.get("max_positions", 0)) != layer.window:
        raise RuntimeError(
            f"layer {layer.layer_idx} attends with sliding_window={sliding_window!r} but the cache was built "
            f"for {layer.window!r} (read from config.layer_types / config.sliding_window); rebuild the cache "
            "with hc.make_cache after changing the config"
        )


@functools.cache
def _forward_takes_cache(model_cls: type) -> bool:
    # deprecate_kwarg wraps forward with functools.wraps, so the signature is the real one
    return "cache" in inspect.signature(model_cls.forward).parameters


def cache_keyword(model=None) -> str:
    """``"cache"`` (newer 5.x; ``past_key_values=`` warns there) or ``"past_key_values"`` (5.2): the
    keyword ``model.forward`` and ``generate`` expect. Without a model the installed Llama decides."""
    if model is None:
        from transformers import LlamaForCausalLM

        model_cls = LlamaForCausalLM
    else:
        model_cls = type(model)
    return "cache" if _forward_takes_cache(model_cls) else "past_key_values"


def cache_kwargs(cache, model=None) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, for ``model(...)`` and ``model.generate(...)``."""
    if isinstance(model, Cache) or isinstance(cache, torch.nn.Module):
        raise TypeError("cache_kwargs(cache, model): pass the cache first, then the model "
                        f"(got {type(cache).__name__}, {type(model).__name__})")
    return {cache_keyword(model): cache}


def register() -> str:
    """Register the attention and mask functions (idempotent); returns the implementation name."""
    AttentionInterface.register(NAME, headwise_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def prepare_model(model) -> None:
    """Register heterocache's attention and switch the model to it (idempotent).

    With any other cache (e.g. ``DynamicCache``) the function is plain SDPA, so the model stays
    usable for everything else.
    """
    name = register()
    if getattr(model.config, "_attn_implementation", None) != name:
        model.set_attn_implementation(name)


def make_cache(model, method: str = "full", keep: float = 1.0, *, attention_backend: str = "auto",
               max_buckets: int = 4, bucket_overhead: int = 256, **options: Any) -> HeadwiseCache:
    """Build a :class:`HeadwiseCache` for ``model`` compressing with ``method`` at ``keep``.

    ``options`` are the method's dataclass fields (``heterocache methods`` lists them), validated
    here: unknown methods or options, wrong types, values out of range and ``keep`` outside (0, 1]
    raise ``ValueError`` naming the argument. ``attention_backend``: decode attention kernel,
    ``"auto"`` (the Triton paged kernel on CUDA when triton is installed, else batched SDPA per
    bucket), ``"sdpa"`` or ``"triton"``. ``max_buckets`` / ``bucket_overhead``: how sequences of
    different lengths are grouped (``attention.ragged.plan_buckets``).
    """
    if attention_backend not in BACKENDS:
        raise ValueError(f"attention_backend={attention_backend!r} is invalid; choose one of {list(BACKENDS)}")
    for name, value in (("max_buckets", max_buckets), ("bucket_overhead", bucket_overhead)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "max_buckets" else 0):
            raise ValueError(f"{name}={value!r} must be an integer >= {1 if name == 'max_buckets' else 0}")
    keep = validate_keep(keep)
    instance = build_method(method, **options)
    instance.bind_model(model)
    geometry = model_geometry(model)
    prepare_model(model)
    device = next(model.parameters()).device
    if attention_backend == "auto":
        from heterocache.attention.triton import triton_available

        attention_backend = "triton" if device.type == "cuda" and triton_available(device) else "sdpa"
    return HeadwiseCache(
        instance, keep, geometry["n_layers"], geometry["n_kv_heads"], geometry["head_dim"],
        bucket_options={"max_buckets": max_buckets, "overhead": bucket_overhead}, geometry=geometry,
        attention_backend=attention_backend, model_config=model.config, layer_windows=layer_windows(model),
    )
