"""The transformers versions we support (5.2 .. 5.x) differ in how a cache is passed and asked.

- transformers < ~5.3 (kvpress 0.5.5 pins ``<5.3``): ``model(..., past_key_values=cache)``,
  ``cache_position`` in the forward kwargs, ``CacheLayerMixin.get_mask_sizes(cache_position)`` and
  an abstract ``get_max_cache_shape()``.
- newer 5.x: ``model(..., cache=cache)`` (``past_key_values=`` warns, removal announced),
  no ``cache_position``, ``get_mask_sizes(query_length)`` and ``get_max_length()``.

Call sites pass the cache with ``**cache_kwargs(cache, model)`` and work on both.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


@functools.cache
def _forward_takes_cache(model_cls: type) -> bool:
    # deprecate_kwarg wraps forward with functools.wraps, so the signature is the real one
    return "cache" in inspect.signature(model_cls.forward).parameters


def cache_keyword(model=None) -> str:
    """``"cache"`` or ``"past_key_values"``: the keyword ``model.forward`` (and ``generate``) expects.

    Without a model the installed transformers' Llama decides (every supported family moved together).
    """
    if model is None:
        from transformers import LlamaForCausalLM

        model_cls = LlamaForCausalLM
    else:
        model_cls = type(model)
    return "cache" if _forward_takes_cache(model_cls) else "past_key_values"


def cache_kwargs(cache, model=None) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, for ``model(...)`` and ``model.generate(...)``."""
    return {cache_keyword(model): cache}


def query_length(cache_position_or_length: torch.Tensor | int) -> int:
    """Number of new tokens from what ``get_mask_sizes`` receives: a ``cache_position (q,)`` tensor (5.2)
    or the query length itself (newer)."""
    if isinstance(cache_position_or_length, torch.Tensor):
        return int(cache_position_or_length.shape[0])
    return int(cache_position_or_length)
