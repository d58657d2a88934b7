"""Compression methods: one module per method, each registering itself (see base.py)."""

import importlib
import pkgutil

from heterocache.methods.base import (
    DecodeContext,
    Method,
    PrefillContext,
    available_methods,
    build_method,
    method_class,
    register,
)

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in {"base", "scoring"}:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "DecodeContext",
    "Method",
    "PrefillContext",
    "available_methods",
    "build_method",
    "method_class",
    "register",
]
