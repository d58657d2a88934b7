"""Query-driven retrieval for compressed heads: the default HeteroCache policy (docs/DESIGN.md s.5).

Every compressed head of a full-attention layer holds on the device, inside its kept-token budget:

- a static part chosen at prefill (sinks, the most recent tokens, the best expected-attention rest);
- ``count`` dynamic slots, refilled before the attention of every decode step with the prompt
  pages that this step's own queries point at. The paging, the slow tier and the moving of pages
  are the shared retrieval engine's (``heterocache/retrieval/engine.py``);
- a device-resident index (``retrieval/index.py``: page means, or a rank-``rank`` key sketch whose
  page score is the log-sum-exp of its tokens' sketched logits), whose bytes ``method.budgets``
  pays out of the kept-token budget.

Selection per sequence (batch row x KV head): the index's estimate of ``scaling * q . k``, shifted
per query row by its maximum, max over the group's query rows (plus ``stick`` for resident pages:
hysteresis, fewer bytes moved); the best pages fill the slots. The drift gate (``drift``, the
method's ``refresh_drift``) skips a sequence's selection while its projected queries stay within
that relative distance of those it last refilled with. On the CPU the whole refill is one C call
(``retrieval/native_refill.py``) where it applies; the PyTorch ops here are its reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from heterocache.retrieval import native_refill
from heterocache.retrieval.engine import RetrievalEngine
from heterocache.retrieval.index import build_index
from heterocache.retrieval.slots import PagedSlots, choose_units


@dataclass(frozen=True)
class DynamicSettings:
    index: str  # "pages" (page-mean keys) or "sketch" (per-token rank-`rank` projection)
    page: int  # prompt tokens per page (the unit fetched)
    rank: int  # sketch rank
    stick: float  # score bonus of resident pages
    summary_dtype: torch.dtype  # storage dtype of the index
    offload: str  # slow tier of the full prompt K/V ("host", "disk", "none")
    offload_dir: Any
    refill: str = "auto"  # block-layout refill on the CPU: "auto" / "native" (heterocache.native) / "torch"
    page_score: str = "lse"  # sketch: a page scores as the log-sum-exp ("lse") or the max of its tokens
    drift: float = 0.0  # refill a sequence only when its projected queries moved more than this (0: every step)
    prefetch: str = "none"  # "speculate": each layer's refill chosen one layer early (retrieval/speculate.py);
    # "verify": then the true query's drift gate against the speculated anchors may refill again (critical)


def unit_scores(slots: PagedSlots, queries: torch.Tensor, stick: float) -> torch.Tensor:
    """``(n, P)`` selection scores of the pages for ``queries (n, R, D)`` (R = group x q): the index's
    page scores (with the selection base) plus ``stick`` for resident pages."""
    score = slots.index.page_scores(queries, slots.base)
    if stick:
        score = score + stick * slots.resident
    return score


def choose(slots: PagedSlots, queries: torch.Tensor, stick: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Pages ``(n, width)`` for the dynamic slots from ``queries (n, R, D)``, in no particular order; rows
    where ``keep (n,)`` is set choose the pages they hold (the drift gate skipped them)."""
    score = unit_scores(slots, queries, stick)
    if keep is not None:
        score = torch.where(keep[:, None], slots.resident.float(), score)
    return choose_units(slots, score)


class DynamicRetrieval:
    """HeteroCache's per-step policy over the shared :class:`RetrievalEngine`."""

    def __init__(self, settings: DynamicSettings):
        self.settings = settings
        self.engine = RetrievalEngine(settings.offload, settings.offload_dir)
        self.skipped_pending: torch.Tensor | None = None  # PyTorch path's drift-gate skips not yet counted
        self.speculator = None  # prefetch="speculate": the decoder-layer hooks (bind)

    @property
    def layers(self) -> dict[int, PagedSlots]:
        return self.engine.layers

    @property
    def counters(self):
        return self.engine.counters

    @property
    def allow_blocks(self) -> bool:
        return self.engine.allow_blocks

    @allow_blocks.setter
    def allow_blocks(self, value: bool) -> None:
        self.engine.allow_blocks = value

    # --- prefill -------------------------------------------------------------------------------
    def watch(self, ctx, heads: list[int], static: torch.Tensor, counts: torch.Tensor,
              scores: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """Keep the paged prompt K/V of ``heads`` (every batch row) in the tier, build their index, and
        return what to keep beyond ``static``, ``(B, len(heads), T)`` bool: the first dynamic pages (the
        best by prefill ``scores``; replaced at the first decode step) and the few remainder tokens
        that do not fill a page (kept statically, ``page_layout``).

        ``static (B, len(heads), T)``: the prefill's static part; ``counts (B, len(heads))``: dynamic
        tokens per sequence (page multiples); ``scores (B, len(heads), T)``; ``rows``: the batch rows
        that retrieve (default all; the others get nothing here and no slots).
        """
        b, _, length, d = ctx.keys.shape
        rows = list(range(b)) if rows is None else rows
        picked = rows if len(rows) < b else slice(None)
        keys = ctx.keys[picked][:, heads].reshape(-1, length, d)
        values = ctx.values[picked][:, heads].reshape(-1, length, d)
        valid = ctx.valid[picked][:, None, :].expand(-1, len(heads), -1).reshape(-1, length)
        selectable = valid & ~static[picked].reshape(-1, length)
        n_kv, page = ctx.n_kv_heads, self.settings.page
        seq = [row * n_kv + h for row in rows for h in heads]
        slots, extra, paged_keys = self.engine.page(
            ctx.layer_idx, keys, values, selectable, scores[picked].reshape(-1, length),
            counts[picked].reshape(-1) // page, page, seq, seq == list(range(b * n_kv)),
            ctx.queries.shape[1] // n_kv, ctx.scaling)
        settings = self.settings
        slots.index = build_index(settings.index, paged_keys, keys, valid, slots.real_pages(), page, settings.rank,
                                  settings.summary_dtype, ctx.scaling, settings.page_score == "lse")
        held = (slots.held_tokens() | extra).view(len(rows), len(heads), length)
        if len(rows) == b:
            return held
        out = torch.zeros((b, len(heads), length), dtype=torch.bool, device=held.device)
        out[rows] = held
        return out

    # --- decode --------------------------------------------------------------------------------
    def after_store(self, layer) -> None:
        """End of ``layer``'s prefill: map the slots now (``_prepare``), while the storage is warm,
        instead of at the first decode step."""
        slots = self.layers.get(layer.layer_idx)
        if slots is not None and slots.width:
            self._prepare(layer, slots)

    def _prepare(self, layer, slots: PagedSlots) -> None:
        """The drift gate's state, and the slot mapping after each store (then the C refill's set-up)."""
        if self.settings.drift > 0 and slots.anchors is None:  # kept in place (the C routine points at it)
            slots.anchors = torch.zeros(len(slots.seq), slots.group, slots.index.channels, device=layer.device)
            slots.anchored = torch.zeros(len(slots.seq), dtype=torch.bool, device=layer.device)
        if slots.version != layer.version:
            self.engine.prepare(layer, slots)
            start = time.perf_counter()
            slots.native = native_refill.setup(self.engine, layer, slots, self.settings.refill, self.settings.stick,
                                               self.settings.drift)
            self.counters.layout_s += time.perf_counter() - start

    def before_attention(self, layer, queries: torch.Tensor) -> None:
        """Refill ``layer``'s dynamic slots for this step's ``queries (B, Hq, q, D)``, unless the
        speculator refilled them one layer early in this forward (``prefetch="speculate"``)."""
        self.engine.wait(layer.layer_idx)  # a prefetch on the CUDA copy stream lands before this attention
        if self.speculator is not None and self.speculator.take(layer.layer_idx):
            if self.settings.prefetch != "verify":
                return
            # verify: the true query's drift gate against the speculated anchors; where they differ
            # by more than ``drift`` the step refills with its own query (critical bytes)
        self.refill(layer, queries)

    def refill(self, layer, queries: torch.Tensor, prefetched: bool = False) -> None:
        """The drift gate and the refill of ``layer``'s dynamic slots for ``queries (B, Hq, q, D)``: one C
        call, or its PyTorch reference (``choose`` + the engine's swap). ``prefetched``: the queries were
        speculated a layer early (``retrieval/speculate.py``), so the bytes count as prefetched."""
        slots = self.layers.get(layer.layer_idx)
        if slots is None or not slots.width:
            return
        self._prepare(layer, slots)
        start = time.perf_counter()
        self.engine.prefetching = prefetched
        try:
            if not (slots.native and native_refill.run(self.engine, layer, slots, queries, self.settings.refill)):
                b, hq, q, d = queries.shape
                n_kv = layer.n_kv_heads
                grouped = queries.reshape(b * n_kv, (hq // n_kv) * q, d)
                if not slots.every_row:
                    grouped = grouped[slots.seq_ids]
                chosen = choose(slots, grouped, self.settings.stick, self._drift_gate(slots, grouped))
                self.engine.swap(layer, slots, chosen)
        finally:
            self.engine.prefetching = False
        self.counters.refreshes += 1
        self.counters.select_s += time.perf_counter() - start

    def bind(self, model, cache) -> None:
        """``prefetch="speculate"``: hook ``model``'s decoder layers (a layer refills the next one)."""
        if self.settings.prefetch in ("speculate", "verify", "speculate_late"):
            from heterocache.retrieval.speculate import Speculator

            self.speculator = Speculator(model, cache, self, late=self.settings.prefetch == "speculate_late")

    def _drift_gate(self, slots: PagedSlots, grouped: torch.Tensor) -> torch.Tensor | None:
        """``(n,)`` bool: sequences whose projected queries moved less than ``drift`` (relative
        Frobenius distance) since their last refill keep their pages this step (None: all refill); the
        others record theirs. The C routine's ``due`` does the same."""
        n = grouped.shape[0]
        self.counters.checked += n
        if self.settings.drift <= 0:
            return None
        projected = slots.index.project(grouped)
        if projected.shape[1] != slots.anchors.shape[1]:  # a multi-token step: refill all, no anchors
            slots.anchored.zero_()
            return None
        moved = (projected - slots.anchors).square().sum((1, 2))
        length = slots.anchors.square().sum((1, 2))
        keep = slots.anchored & (moved < self.settings.drift ** 2 * length)
        # counted on the device (no host sync per layer on CUDA); read by ``stats``
        self.skipped_pending = keep.sum() if self.skipped_pending is None else self.skipped_pending + keep.sum()
        slots.anchors.copy_(torch.where(keep[:, None, None], slots.anchors, projected))  # in place, no sync
        slots.anchored |= ~keep
        return keep

    # --- generate's edits: beam reorders, draft rejection ---------------------------------------
    def select_rows(self, layer, indices: torch.Tensor) -> None:
        self.engine.select_rows(layer, indices)

    def crop(self, layer, length: int) -> None:
        self.engine.crop(layer, length)

    def stats(self) -> dict[str, Any]:
        if self.skipped_pending is not None:
            self.counters.skipped += int(self.skipped_pending)
            self.skipped_pending = None
        out = self.engine.stats(self.engine.index_bytes())
        out["summary_bytes"] = self.engine.index_bytes()
        return out

    def close(self) -> None:
        if self.speculator is not None:
            self.speculator.close()
            self.speculator = None
        self.engine.close()
