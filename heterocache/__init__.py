"""heterocache: long-context inference with a compressed, per-head (heterogeneous) KV cache."""

from heterocache.api import make_cache
from heterocache.cache import HeadwiseCache
from heterocache.methods.base import available_methods
from heterocache.models import load_model

__all__ = ["HeadwiseCache", "available_methods", "load_model", "make_cache"]
__version__ = "0.1.0"
