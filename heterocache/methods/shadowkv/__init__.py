"""ShadowKV: the method (``method.py``) and its device index of low-rank keys and chunk landmarks (``index.py``)."""

from heterocache.methods.shadowkv.method import ShadowKV

__all__ = ["ShadowKV"]
