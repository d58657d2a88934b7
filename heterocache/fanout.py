"""FanoutCache: one prefill forward that fills several fresh caches of the same model at once.

The prefill is exact for every method (each layer's attention is full SDPA; a cache compresses only
after it, docs/DESIGN.md s.3), so the hidden states of a prompt's prefill are the same whatever
cache receives it; only what each cache keeps differs. A :class:`FanoutCache` over ``children``
(``HeadwiseCache``s of any methods and keeps, plus at most one plain ``DynamicCache``, e.g. the
FullKV reference) is handed to the model for exactly one forward:

- ``update(key, value, layer_idx)`` passes the layer's new ``key/value (B, Hkv, T, D)`` to every
  child (a ``HeadwiseLayer`` returns its prefill ``PendingKV``, a ``DynamicCache`` stores its own
  copy) and returns a :class:`FanoutKV` handle;
- the registered attention (``hf.headwise_attention``) recognises the handle, computes the exact
  SDPA output once (the same call as a single cache's prefill, so the output is bit-identical) and
  then runs every ``HeadwiseCache`` child's ``compress`` in turn; each child's seconds in
  ``compress`` add up in its ``compress_s`` (also in its ``stats()``);
- masks and positions come from the first ``HeadwiseCache`` child's layers (``get_seq_length``,
  ``get_mask_sizes``, ``is_sliding``), i.e. exactly what that cache alone answers for a prefill.

Afterwards each child is an ordinary cache, used on its own (decode, generate). The layer's full
keys/values live only as long as the handle (one layer's attention); nothing but the children's
own storage grows with the number of children.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from heterocache.cache import HeadwiseCache, HeadwiseLayer, PendingKV


@dataclass
class FanoutKV:
    """What :meth:`FanoutCache.update` hands the registered attention function instead of tensors."""

    keys: torch.Tensor  # (B, Hkv, T, D) the prompt's keys of this layer
    values: torch.Tensor
    pending: list[PendingKV]  # one per HeadwiseCache child, in the children's order (prefill=True)

    @property
    def layers(self) -> list[HeadwiseLayer]:
        return [p.layer for p in self.pending]

    @property
    def shape(self):  # some model code reads key.shape[-2] (kv length)
        return self.keys.shape


class FanoutLayer(CacheLayerMixin):
    """Layer ``layer_idx`` of a fan-out: answers the mask and length queries as the lead child's layer."""

    is_compileable = False

    def __init__(self, lead: HeadwiseLayer):
        super().__init__()
        self.lead = lead
        self.is_sliding = lead.is_sliding

    def lazy_initialization(self, key_states, value_states) -> None:  # the children initialise themselves
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("FanoutLayer.update is not called: FanoutCache.update serves every layer")

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        return self.lead.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.lead.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name of get_max_length in transformers < 5.3
        return -1


class FanoutCache(Cache):
    """Fill ``children`` with one prefill forward (see the module docstring).

    ``children``: at least one empty ``HeadwiseCache`` (all built for the same model) and at most one
    empty ``DynamicCache``; anything else, a used child, the same child twice or a second forward
    raises ``ValueError``.
    """

    def __init__(self, children: Sequence[Cache]):
        self.children = list(children)
        self.headwise = [c for c in self.children if isinstance(c, HeadwiseCache)]
        self.dense = [c for c in self.children if not isinstance(c, HeadwiseCache)]
        _check_children(self.children, self.headwise, self.dense)
        lead = self.headwise[0]
        super().__init__(layers=[FanoutLayer(layer) for layer in lead.layers])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``key_states/value_states (B, Hkv, T, D)`` of layer ``layer_idx`` to every child; returns
        ``(handle, handle)`` with ``handle`` a :class:`FanoutKV`."""
        if self.headwise[0].layers[layer_idx].seen:
            raise ValueError("a FanoutCache serves exactly one prefill forward; after it, use each child cache "
                             "on its own (this forward would be the second one through it)")
        pending = []
        for child in self.headwise:
            handle, _ = child.update(key_states, value_states, layer_idx, *args, **kwargs)
            pending.append(handle)
        for child in self.dense:
            child.update(key_states, value_states, layer_idx, *args, **kwargs)
        handle = FanoutKV(key_states, value_states, pending)
        return handle, handle

    @property
    def compress_s(self) -> list[float]:
        """Seconds each child spent in ``compress`` (0.0 for a ``DynamicCache``), in the children's order."""
        return [getattr(child, "compress_s", 0.0) for child in self.children]


def _check_children(children: list, headwise: list[HeadwiseCache], dense: list) -> None:
    """Refuse with ``ValueError`` what one shared prefill cannot fill exactly."""
    if not headwise:
        raise ValueError("a FanoutCache needs at least one HeadwiseCache child (hc.make_cache)")
    if len({id(c) for c in children}) != len(children):
        raise ValueError("a FanoutCache got the same cache twice; give each job its own cache")
    for child in dense:
        if type(child) is not DynamicCache:
            raise ValueError(f"a FanoutCache child must be a HeadwiseCache or a plain DynamicCache, not "
                             f"{type(child).__name__}")
    if len(dense) > 1:
        raise ValueError(f"a FanoutCache takes at most one DynamicCache (got {len(dense)}): they would hold the "
                         "same tensors")
    for child in children:
        if child.get_seq_length() or any(getattr(layer, "is_initialized", False) for layer in child.layers):
            raise ValueError(f"a FanoutCache child is not empty ({type(child).__name__} has seen "
                             f"{child.get_seq_length()} tokens); fan out over fresh caches only")
    lead = headwise[0]
    for child in headwise[1:]:
        same_config = child.model_config is lead.model_config
        same_shape = (child.n_layers, child.n_kv_heads, child.head_dim, child.layer_windows,
                      child.model_geometry) == (lead.n_layers, lead.n_kv_heads, lead.head_dim,
                                                lead.layer_windows, lead.model_geometry)
        if not (same_config and same_shape):
            raise ValueError("a FanoutCache's HeadwiseCaches were built for different models; build every child "
                             "with hc.make_cache on the model that runs the forward")
    for child in dense:
        if child.layers and len(child.layers) != lead.n_layers:
            raise ValueError(f"the DynamicCache has {len(child.layers)} layers, the model {lead.n_layers}: it was "
                             "built for a different model")
