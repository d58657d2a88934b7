"""The method side of the retrieval engine: hooks every retrieving peer shares (Quest, ShadowKV, OmniKV).

A subclass is a method dataclass (``methods/base.py``) that, in ``select``, keeps its static tokens
and pages the rest of a retrieving layer through ``self.engine.page(...)`` (setting
``slots.index``), and that implements :meth:`RetrievingMethod.wanted`: the pages a decode step's
queries want. Everything else (slot mapping after each store, the swaps, beam reorders, crops,
bytes moved, the tier) is the engine's.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from heterocache.methods.base import Method
from heterocache.retrieval.engine import RetrievalEngine
from heterocache.retrieval.slots import PagedSlots


def grouped_queries(queries: torch.Tensor, n_kv_heads: int, slots: PagedSlots) -> torch.Tensor:
    """``queries (B, Hq, q, D)`` as ``(n, group * q, D)``, one row block per sequence of ``slots``."""
    b, hq, q, d = queries.shape
    grouped = queries.reshape(b * n_kv_heads, (hq // n_kv_heads) * q, d)
    return grouped if slots.every_row else grouped[slots.seq_ids]


class RetrievingMethod(Method):
    """Base of the methods that retrieve through a :class:`RetrievalEngine` (see the module)."""

    offload: str = "host"
    offload_dir: Any = None

    def setup(self, cache) -> None:
        self.close()
        self.engine = RetrievalEngine(self.offload, self.offload_dir)
        self.n_kv_heads = cache.n_kv_heads

    def wanted(self, layer, slots: PagedSlots, queries: torch.Tensor) -> torch.Tensor | None:
        """Pages ``(n, width)`` the step's ``queries (B, Hq, q, D)`` want in the dynamic slots (None:
        keep what is there)."""
        raise NotImplementedError

    def after_store(self, layer) -> None:
        slots = self.engine.layers.get(layer.layer_idx)
        if slots is not None and slots.width:
            self.engine.prepare(layer, slots)

    def before_decode_attention(self, layer, queries: torch.Tensor) -> None:
        slots = self.engine.layers.get(layer.layer_idx)
        if slots is None or not slots.width:
            return
        self.engine.prepare(layer, slots)
        start = time.perf_counter()
        chosen = self.wanted(layer, slots, queries)
        self.engine.counters.checked += len(slots.seq)
        if chosen is not None:
            self.engine.swap(layer, slots, chosen)
        else:
            self.engine.counters.skipped += len(slots.seq)
        self.engine.counters.refreshes += 1
        self.engine.counters.select_s += time.perf_counter() - start

    def on_batch_select(self, layer, indices: torch.Tensor) -> None:
        self.engine.select_rows(layer, indices)

    def on_crop(self, layer, length: int) -> None:
        self.engine.crop(layer, length)

    def device_extra_bytes(self) -> int:
        """Device bytes the method holds beyond the layers' storage and the engine's indexes."""
        return 0

    def stats(self) -> dict[str, Any]:
        out = self.engine.stats(self.engine.index_bytes() + self.device_extra_bytes())
        out["index_bytes"] = self.engine.index_bytes()
        return out

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
