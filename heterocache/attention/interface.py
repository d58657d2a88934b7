"""The registered attention function (``attn_implementation="heterocache"``).

Prefill (first forward into an empty :class:`~heterocache.cache.HeadwiseCache`): exact causal
attention over the full keys/values with transformers' own SDPA path (so FullKV is bit-identical),
then the cache's method selects the tokens each KV head keeps. Decode: the new tokens were already
appended by ``update()``; attention runs over each head's ragged kept set. Given plain tensors
(e.g. a ``DynamicCache``), it is exactly SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from heterocache.cache import PendingKV
from heterocache.methods.base import DecodeContext, PrefillContext

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
    if not isinstance(key, PendingKV):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask,
                                               dropout=dropout, scaling=scaling, **kwargs)
    layer = key.layer
    cache = layer.cache
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    sliding_window = kwargs.get("sliding_window")
    if key.prefill:
        out, _ = sdpa_attention_forward(module, query, key.keys, key.values, attention_mask,
                                        scaling=scaling, dropout=dropout, **kwargs)
        _compress(layer, cache, module, query, key.keys, key.values, attention_mask, scaling)
        return out, None
    if cache.has_pre_hook:
        cache.method.before_decode_attention(layer, cache)
    out = layer.attend(query, scaling, sliding_window)
    layer.decode_steps += 1
    if cache.has_decode_hook:
        cache.method.on_decode_step(DecodeContext(
            layer_idx=layer.layer_idx, n_layers=cache.n_layers, queries=query, layer=layer,
            step=layer.decode_steps, scaling=scaling, keep=cache.keep, state=cache.method_state, cache=cache,
        ))
    return out, None


def _compress(layer, cache, module, query, keys, values, attention_mask, scaling) -> None:
    b, h, length, _ = keys.shape
    valid = valid_from_mask(attention_mask, b, length, keys.device)
    prompt_lengths = valid.sum(-1)
    if cache.prompt_lengths is None:
        cache.prompt_lengths = prompt_lengths
    layer.prefill_len = length
    ctx = PrefillContext(
        layer_idx=layer.layer_idx, n_layers=cache.n_layers, queries=query, keys=keys, values=values,
        valid=valid, prompt_lengths=prompt_lengths, scaling=scaling, keep=cache.keep,
        state=cache.method_state, cache=cache, module=module,
    )
    keep = cache.method.select(ctx)
    if keep.shape != (b, h, length) or keep.dtype != torch.bool:
        raise RuntimeError(
            f"method {cache.method.name!r} returned a mask of shape {tuple(keep.shape)} / {keep.dtype}; "
            f"expected bool {(b, h, length)}"
        )
    positions = torch.arange(length, device=keys.device).expand(b, h, length)
    layer.store(keys, values, positions, keep & valid[:, None, :])
    if hasattr(cache.method, "after_store"):
        cache.method.after_store(ctx, layer)


def register() -> str:
    """Register the attention and mask functions (idempotent); returns the implementation name."""
    AttentionInterface.register(NAME, headwise_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
