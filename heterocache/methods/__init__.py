"""Compression methods: one module per method; the registry (base.py) names the built-ins explicitly."""

from heterocache.methods.base import (
    DecodeContext,
    Method,
    PrefillContext,
    available_methods,
    build_method,
    method_class,
    register,
)

__all__ = [
    "DecodeContext",
    "Method",
    "PrefillContext",
    "available_methods",
    "build_method",
    "method_class",
    "register",
]
