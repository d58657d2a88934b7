"""OmniKV (Hao et al., ICLR 2025): filter layers choose the context of the layers after them."""

from heterocache.methods.omnikv.method import OmniKV
from heterocache.methods.omnikv.plan import Plan, default_filter_layers, resolve_plan

__all__ = ["OmniKV", "Plan", "default_filter_layers", "resolve_plan"]
