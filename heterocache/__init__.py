"""heterocache: long-context inference with a compressed, per-head (heterogeneous) KV cache."""

from heterocache.cache import HeadwiseCache
from heterocache.hf import cache_kwargs, make_cache
from heterocache.methods.base import available_methods
from heterocache.models import load_model
from heterocache.profiling.api import profile_heads
from heterocache.profiling.profile import HeadProfile

__all__ = ["HeadProfile", "HeadwiseCache", "available_methods", "cache_kwargs", "load_model", "make_cache",
           "profile_heads"]
__version__ = "0.1.0"
