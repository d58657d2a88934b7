"""HeteroCache: the method (``method.py``), its drift monitor and refresh scheduler (``runtime.py``)
and the slow tiers holding the satellites' full copies (``tiers.py``)."""

from heterocache.methods.heterocache.method import HeteroCache

__all__ = ["HeteroCache"]
