"""Query-driven retrieval for compressed heads: the default HeteroCache runtime (docs/DESIGN.md s.5).

Every compressed head of a full-attention layer holds on the device, inside its kept-token budget:

- a static part chosen at prefill (sinks, the most recent tokens, the best expected-attention rest);
- ``count`` dynamic slots, refilled before the attention of every decode step with the prompt
  pages that this step's own queries point at. At prefill the head's non-static prompt tokens are
  cut, in position order, into pages of ``page`` tokens (``page_layout``); the slow tier (host
  memory or disk) keeps them in that layout, so a page is fetched as one block;
- a device-resident index, whose bytes ``method.budgets`` pays out of the kept-token budget:
  ``index="pages"``, the mean key of every page; or ``index="sketch"``, every paged key projected on
  the head's top-``rank`` right singular vectors (Loki-style), a page scoring as the log-sum-exp
  of its tokens' sketched logits (``page_score="max"``: its best token);
  both stored in ``summary_dtype`` (int8: with an fp32 scale per channel).

Selection per sequence (batch row x KV head): approximate ``scaling * q . k`` from the index,
shifted per query row by its maximum, max over the group's query rows (plus ``stick`` for resident
pages: hysteresis, fewer bytes moved); the best pages fill the slots. Only pages not already
resident are fetched and counted as moved. The drift gate (``drift``, the method's
``refresh_drift``) skips a sequence's selection while its projected queries (``project``) stay within
that relative distance of those it last refilled with.
"""

from __future__ import annotations

import ctypes
import math
import time
from dataclasses import dataclass, fields
from typing import Any

import torch

from heterocache import native
from heterocache.methods.heterocache.tiers import MemoryTier, Tier, make_tier
from heterocache.methods.scoring import topk_mask


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


@dataclass
class DynamicCounters:
    """Reported by ``cache.stats()`` as ``retrieval_<name>``."""

    refreshes: int = 0  # (layer, step) selections
    tokens: int = 0  # tokens fetched that were not resident
    bytes: int = 0  # bytes of keys + values of those tokens
    checked: int = 0  # (layer, sequence, step) refill decisions
    skipped: int = 0  # of which not refilled: queries within ``drift`` of the last refill's
    select_s: float = 0.0  # time spent choosing + fetching + writing (on the decode critical path)
    layout_s: float = 0.0  # mapping the slots after each store (once per prefill, at its end: ``after_store``)

    def as_stats(self) -> dict[str, float]:
        return {f"retrieval_{f.name}": getattr(self, f.name) for f in fields(self)}


@dataclass
class LayerSlots:
    """Dynamic-slot state of one layer: ``n`` sequences (batch row x compressed KV head).

    Selection works on *units*: pages of ``unit`` selectable prompt tokens of a sequence, in position
    order (``page=1``: single tokens); the copy in the tier is kept in that page layout.
    """

    seq: list[int]  # cache sequence ids b * Hkv + h
    resident: torch.Tensor  # (n, U) bool: the units now in the dynamic slots
    counts: torch.Tensor  # (n,) units held per sequence
    width: int  # max(counts)
    summaries: torch.Tensor  # pages: (n, D, P) mean keys; sketch: (n, r, unit * P) projected paged keys, column
    # g * P + p = token g of page p (a page's max / log-sum-exp then runs over ``unit`` contiguous rows of P)
    basis: torch.Tensor | None  # sketch: (n, D, r) fp32 top right singular vectors of the keys x scaling
    scaling: float
    base: torch.Tensor  # (n, P) fp32 added to the page scores: 0, or -inf on padding pages
    length: int  # prompt length T
    page_positions: torch.Tensor  # (n, P, unit) prompt position of every page token (``page_layout``)
    channel_scale: torch.Tensor | None = None  # int8 summaries: (n, 1, C) fp32 per-channel scale
    channels: int = 0  # C: index channels (sketch rank, or head_dim for page means)
    summary_block: int = 0  # > 0: ``summaries`` are ``(n, C * G * P)`` in the native refill's block layout
    # (``to_blocks``) of runs of ``summary_block`` pages
    unit: int = 1  # prompt tokens per unit
    slot_of: torch.Tensor | None = None  # (n, T) storage slot holding each resident prompt position
    seq_ids: torch.Tensor | None = None  # ``seq`` as a tensor
    version: int = -1  # the layer storage version ``slot_of`` was computed for
    every_row: bool = False  # ``seq`` is every sequence of the layer in order (no query gather)
    group: int = 1  # query heads per KV head
    uniform: bool = True  # every sequence has ``width`` units
    blocks: bool = False  # unit slot k of a sequence = storage slots [k * unit, (k + 1) * unit) (``_layout``)
    current: torch.Tensor | None = None  # blocks: (n, width) the unit in each unit slot
    page_lse: bool = True  # sketch: page score = log-sum-exp of its tokens' scores (else their max)
    native: bool = False  # refilled by the fused C routine (``_refill_native``): the block layout, or
    # any layout of plain buckets whose rows were given unit slots by ``_row_layout``
    anchors: torch.Tensor | None = None  # (n, group, C) fp32 projected queries of each sequence's last refill
    anchored: torch.Tensor | None = None  # (n,) bool: ``anchors`` holds one
    native_job: Any = None  # its argument (``native.RefillJob``), set up by ``_native_applies``
    native_buckets: Any = None  # the storage addresses it reads (``ctypes`` array)
    native_seen: list = ()  # the bucket tensors those addresses belong to (refreshed when replaced)
    native_ref: Any = None  # ``ctypes.byref(native_job)``
    native_call: Any = None  # the C function
    native_page_bytes: int = 0  # bytes of one page's keys (or values)
    native_keep: tuple = ()  # tensors the job points into, beyond the slots' own

    def __post_init__(self) -> None:
        self.uniform = bool((self.counts == self.width).all())

    def held_tokens(self) -> torch.Tensor:
        """``(n, T)`` bool: the prompt tokens in the dynamic slots."""
        n = self.resident.shape[0]
        held = torch.zeros(n, self.length, dtype=torch.bool, device=self.resident.device)
        pages = self.resident[:, :, None].expand(-1, -1, self.unit)
        rows = torch.arange(n, device=held.device)[:, None, None].expand_as(pages)
        held[rows[pages], self.page_positions[pages]] = True
        return held


def index_bytes(slots: LayerSlots) -> int:
    """Device bytes of a layer's index: the summaries, the sketch basis and the int8 channel scales."""
    return sum(t.numel() * t.element_size() for t in (slots.summaries, slots.basis, slots.channel_scale)
               if t is not None)


def page_means(keys: torch.Tensor, selectable: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys (n, T, D)``, ``selectable (n, T)`` -> mean selectable key per page ``(n, P, D)`` fp32 and
    ``has (n, P)``: the page holds a selectable token."""
    n, length, d = keys.shape
    pages = math.ceil(length / page)
    pad = pages * page - length
    k = torch.nn.functional.pad(keys.float(), (0, 0, 0, pad)).view(n, pages, page, d)
    free = torch.nn.functional.pad(selectable, (0, pad), value=False).view(n, pages, page)
    count = free.sum(-1, keepdim=True)
    return (k * free[..., None]).sum(2) / count.clamp(min=1), count[..., 0] > 0


def summary_tokens(prompt_len: int, page: int, summary_bytes: int, kv_bytes: int) -> float:
    """Device cost of one head's page summaries in kept-token units (a token = a key and a value);
    int8 summaries add their fp32 per-channel scale."""
    scale = 4 if summary_bytes == 1 else 0
    return (math.ceil(prompt_len / page) * summary_bytes + scale) / (2 * kv_bytes)


def sketch_tokens(prompt_len: int, rank: int, head_dim: int, summary_bytes: int, kv_bytes: int) -> float:
    """Device cost of one head's rank-``rank`` sketch (``T x r`` in the summary dtype + an fp32 ``D x r``
    basis) in kept-token units."""
    scale = rank * 4 if summary_bytes == 1 else 0  # int8: fp32 per-channel scale
    return (prompt_len * rank * summary_bytes + head_dim * rank * 4 + scale) / (2 * head_dim * kv_bytes)


def key_sketch(keys: torch.Tensor, valid: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys (n, T, D)``, ``valid (n, T)`` -> ``(sketch (n, T, r), basis (n, D, r))`` fp32: the keys on
    their top-``rank`` right singular vectors (computed from the valid keys)."""
    masked = keys.float() * valid[..., None]
    basis = torch.linalg.svd(masked, full_matrices=False).Vh[:, :rank].transpose(-1, -2).contiguous()
    return keys.float() @ basis, basis


def to_blocks(summaries: torch.Tensor, group: int, block: int) -> torch.Tensor:
    """Index ``(n, C, G * P)`` (column ``g * P + p``: token g of page p; pages index: G = 1) -> the native
    refill's layout, ``(n, C * G * P)``: per sequence each run of ``block`` pages as ``(G, C, block)``,
    the last (shorter) run likewise, so each block of pages is one contiguous run of memory."""
    n, channels, length = summaries.shape
    pages = length // group
    whole = pages // block * block
    columns = summaries.view(n, channels, group, pages)
    runs = columns[..., :whole].reshape(n, channels, group, whole // block, block).permute(0, 3, 2, 1, 4)
    last = columns[..., whole:].permute(0, 2, 1, 3)
    return torch.cat([runs.reshape(n, -1), last.reshape(n, -1)], dim=1)


def from_blocks(blocks: torch.Tensor, channels: int, group: int, block: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: ``(n, C, G * P)``."""
    n = blocks.shape[0]
    pages = blocks.shape[1] // (channels * group)
    whole = pages // block * block
    runs = blocks[:, : whole * channels * group].view(n, whole // block, group, channels, block)
    last = blocks[:, whole * channels * group:].view(n, group, channels, pages - whole)
    columns = torch.cat([runs.permute(0, 3, 2, 1, 4).reshape(n, channels, group, whole), last.permute(0, 2, 1, 3)],
                        dim=-1)
    return columns.reshape(n, channels, group * pages)


def project(slots: LayerSlots, queries: torch.Tensor) -> torch.Tensor:
    """``queries (n, R, D)`` in the index's channels, ``(n, R, C)`` fp32: on the sketch basis (which carries
    ``scaling``), or ``scaling * q`` for page means; times the int8 channel scale. What the index is
    scored with, and what the drift gate (``refresh_drift``) compares."""
    if slots.basis is not None:
        projected = torch.bmm(queries.float(), slots.basis)
    else:
        projected = queries.float() * slots.scaling
    if slots.channel_scale is not None:
        projected = projected * slots.channel_scale
    return projected


def unit_scores(slots: LayerSlots, queries: torch.Tensor, stick: float) -> torch.Tensor:
    """``(n, U)`` selection scores of the units for ``queries (n, R, D)`` (R = group x q): the index's
    estimate of ``scaling * q . k`` (per token, or against the page's mean key) shifted per query row
    by its maximum, max over the rows, plus the selection base and ``stick`` for resident units."""
    # fp32 compute: a bf16 bmm on CPU costs more than widening the stored index each step
    summaries = slots.summaries
    if slots.summary_block:  # the native layout (a torch fallback after the C path ran): back to columns
        group = slots.unit if slots.basis is not None else 1
        summaries = from_blocks(slots.summaries, slots.channels, group, slots.summary_block)
    if slots.basis is not None:  # per-token sketch; a page scores as the lse (or max) of its tokens
        bound = torch.bmm(project(slots, queries), summaries.float())  # (n, R, unit * P)
        if slots.unit > 1:
            tokens = bound.view(*bound.shape[:2], slots.unit, -1)
            bound = tokens.logsumexp(2) if slots.page_lse else tokens.amax(2)
        bound = bound + slots.base[:, None]
    else:
        q = queries.float() if slots.channel_scale is None else queries.float() * slots.channel_scale
        bound = torch.baddbmm(slots.base[:, None], q, summaries.float(), alpha=slots.scaling)  # (n, R, P)
    bound = bound - bound.amax(-1, keepdim=True).clamp(min=-1e30)
    score = bound.amax(1)
    if stick:
        score = score + stick * slots.resident
    return score


def choose(slots: LayerSlots, queries: torch.Tensor, stick: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Units ``(n, width)`` for the dynamic slots from ``queries (n, R, D)`` (R = group x q), in no
    particular order; a row with fewer than ``width`` units repeats one of its choices. Rows where
    ``keep (n,)`` is set choose the units they hold (the drift gate skipped them)."""
    score = unit_scores(slots, queries, stick)
    if keep is not None:
        score = torch.where(keep[:, None], slots.resident.float(), score)
    if slots.uniform:
        return score.topk(slots.width, dim=-1, sorted=False).indices
    chosen = score.topk(slots.width, dim=-1).indices
    arange = torch.arange(slots.width, device=chosen.device)[None, :]
    last = chosen.gather(1, (slots.counts - 1).clamp(min=0)[:, None])
    return torch.where(arange < slots.counts[:, None], chosen, last)


def page_layout(selectable: torch.Tensor, scores: torch.Tensor, page: int,
                spare: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each row's selectable positions (``(n, T)`` bool) into pages of ``page`` consecutive ones.

    A row's remainder (its count modulo ``page``) is not paged: its highest-``scores`` selectable
    tokens are returned in ``extra`` (to be kept statically) where ``spare (n,)`` allows it, else its
    lowest-scored ones are left out. Returns ``positions (n, P, page)`` long (0 on padding pages),
    ``real (n, P)`` bool and ``extra (n, T)`` bool.
    """
    rows = []
    extra = torch.zeros_like(selectable)
    for i in range(selectable.shape[0]):
        positions = torch.nonzero(selectable[i]).flatten()
        left = positions.numel() % page
        if left:
            order = scores[i, positions].argsort(descending=True, stable=True)
            if spare is None or bool(spare[i]):  # the best ones are kept, the rest paged
                extra[i, positions[order[:left]]] = True
                positions = positions[order[left:].sort().values]
            else:
                positions = positions[order[: positions.numel() - left].sort().values]
        rows.append(positions.view(-1, page))
    pages = max(1, max(r.shape[0] for r in rows))
    out = torch.zeros(len(rows), pages, page, dtype=torch.long, device=selectable.device)
    real = torch.zeros(len(rows), pages, dtype=torch.bool, device=selectable.device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        real[i, : r.shape[0]] = True
    return out, real, extra


class DynamicRetrieval:
    def __init__(self, settings: DynamicSettings):
        self.settings = settings
        self.layers: dict[int, LayerSlots] = {}
        self.tier: Tier | None = None
        self.counters = DynamicCounters()
        self.summary_bytes = 0
        self.allow_blocks = True  # False: always the token-by-token swap (tests compare the two)
        self.skipped_pending: torch.Tensor | None = None  # PyTorch path's drift-gate skips not yet counted

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
        if self.tier is None:
            self.tier = make_tier(self.settings.offload, ctx.keys.device, self.settings.offload_dir)
        picked = rows if len(rows) < b else slice(None)
        keys = ctx.keys[picked][:, heads].reshape(-1, length, d)
        values = ctx.values[picked][:, heads].reshape(-1, length, d)
        valid = ctx.valid[picked][:, None, :].expand(-1, len(heads), -1).reshape(-1, length)
        selectable = valid & ~static[picked].reshape(-1, length)
        flat_scores = scores[picked].reshape(-1, length).float()
        counts = counts[picked]
        n_kv = ctx.n_kv_heads
        seq = [row * n_kv + h for row in rows for h in heads]
        common = {"seq": seq, "scaling": ctx.scaling, "length": length, "every_row": seq == list(range(b * n_kv))}
        page = self.settings.page
        units = counts.reshape(-1) // page
        # a remainder token kept statically costs a page of the dynamic slots: equal rows keep the
        # block layout, so every row of the layer gives one up (unused: fewer than ``page`` tokens)
        spare = units > 0
        positions, real, extra = page_layout(selectable, flat_scores, page, spare)
        if bool(extra.any()):
            units = torch.where(spare, units - 1, units)
        n, pages = real.shape
        flat = positions.view(n, pages * page)
        paged_keys = keys.gather(1, flat[..., None].expand(-1, -1, d))
        self.tier.put(ctx.layer_idx, paged_keys, values.gather(1, flat[..., None].expand(-1, -1, d)))
        basis = None
        if self.settings.index == "sketch":  # every paged key on the head's top singular vectors
            _, basis = key_sketch(keys, valid, self.settings.rank)
            projected = (paged_keys.float() @ basis).view(n, pages, page, -1).transpose(1, 2)
            summaries, scale = self._store_summaries(projected.reshape(n, page * pages, -1))
            self.summary_bytes += basis.numel() * basis.element_size()
            basis = basis * ctx.scaling  # one multiply less per step
        else:
            means, _ = page_means(paged_keys, real.repeat_interleave(page, dim=1), page)
            summaries, scale = self._store_summaries(means)
        page_score = flat_scores.gather(1, flat).view(n, pages, page).sum(-1)
        resident = topk_mask(page_score[None], units[None], real[None])[0]
        units = resident.sum(-1)  # fewer than asked where a row has fewer selectable pages
        base = torch.zeros(n, pages, device=real.device).masked_fill(~real, float("-inf"))
        slots = LayerSlots(resident=resident, counts=units, width=int(units.max()), summaries=summaries,
                           channels=summaries.shape[1], group=ctx.queries.shape[1] // n_kv,
                           channel_scale=scale, basis=basis, base=base, unit=page, page_positions=positions,
                           page_lse=self.settings.page_score == "lse", **common)
        self.layers[ctx.layer_idx] = slots
        held = (slots.held_tokens() | extra).view(len(rows), len(heads), length)
        if len(rows) == b:
            return held
        out = torch.zeros((b, len(heads), length), dtype=torch.bool, device=held.device)
        out[rows] = held
        return out

    def _store_summaries(self, summary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``summary (n, U, C)`` fp32 -> stored ``(n, C, U)`` in the summary dtype and, for int8, the
        per-channel scale ``(n, 1, C)`` (channel maximum / 127; values rounded to the nearest step)
        that the queries are multiplied by instead; the bytes of both are counted."""
        dtype, scale = self.settings.summary_dtype, None
        if dtype == torch.int8:
            scale = summary.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
            summary = (summary / scale).round().clamp(-127, 127)
            self.summary_bytes += scale.numel() * scale.element_size()
        stored = summary.to(dtype).transpose(1, 2).contiguous()
        self.summary_bytes += stored.numel() * stored.element_size()
        return stored, scale

    # --- decode --------------------------------------------------------------------------------
    def _map_slots(self, layer, slots: LayerSlots) -> None:
        """Storage slot of every held prompt position, found by position (after each ``store``); then
        the block layout when it applies (``_layout``)."""
        held = slots.held_tokens()
        length = slots.length
        slot_of = torch.zeros(len(slots.seq), length, dtype=torch.long, device=layer.device)
        for i, seq in enumerate(slots.seq):
            bucket_index, row = layer.locate[seq]
            bucket = layer.buckets[bucket_index]
            bucket.sync_positions()
            n = int(bucket.lengths[row])
            positions = bucket.positions[row, :n].long()
            inside = (positions >= 0) & (positions < length)
            mine = torch.nonzero(inside & held[i, positions.clamp(min=0, max=length - 1)]).flatten()
            count = int(slots.counts[i]) * slots.unit
            if len(mine) != count:
                raise RuntimeError(f"layer {layer.layer_idx}: sequence {seq} holds {len(mine)} dynamic tokens, "
                                   f"expected {count} (its storage was changed outside the method)")
            slot_of[i, positions[mine]] = mine
        slots.slot_of = slot_of
        slots.seq_ids = torch.tensor(slots.seq, device=layer.device)
        slots.version = layer.version
        slots.blocks = self.allow_blocks and self._layout(layer, slots)
        slots.native = self._native_applies(layer, slots)

    def _layout(self, layer, slots: LayerSlots) -> bool:
        """Block layout, when the layer is one plain bucket of every sequence with ``width`` units each:
        each sequence's dynamic tokens move to slots ``[0, width * unit)``, unit by unit (the other
        entries keep their relative order after them; ``_row_layout``), with the capacity kept a
        multiple of ``unit``, so a step replaces whole units with one indexed copy per tensor on a
        ``(n * capacity / unit, unit * D)`` view (``_swap_blocks``) instead of token-by-token writes
        (``_swap``)."""
        if not (slots.every_row and slots.uniform and len(layer.buckets) == 1):
            return False
        bucket = layer.buckets[0]
        if bucket.window is not None or not bucket.is_identity or len(slots.seq) != bucket.keys.shape[0]:
            return False
        bucket.realign(slots.unit)  # now and after any growth, unit slots are rows of (n * capacity / unit, unit * D)
        return self._row_layout(layer, slots)  # needs contiguous storage (the unit-slot views do too)

    def before_attention(self, layer, queries: torch.Tensor) -> None:
        """Refill ``layer``'s dynamic slots for this step's ``queries (B, Hq, q, D)``: unit by unit in
        the block layout (one C call, ``_refill_native``, or its PyTorch reference ``_swap_blocks``),
        else token by token (``_swap``)."""
        slots = self.layers.get(layer.layer_idx)
        if slots is None or not slots.width:
            return
        self._prepare(layer, slots)
        start = time.perf_counter()
        if not (slots.native and self._refill_native(layer, slots, queries)):
            b, hq, q, d = queries.shape
            n_kv = layer.n_kv_heads
            grouped = queries.reshape(b * n_kv, (hq // n_kv) * q, d)
            if not slots.every_row:
                grouped = grouped[slots.seq_ids]
            chosen = choose(slots, grouped, self.settings.stick, self._drift_gate(slots, grouped))
            if slots.blocks:
                slots.native = False  # the torch path replaces ``resident``: the C call's pointers are stale
                self._swap_blocks(layer, slots, chosen)
            else:
                self._swap(layer, slots, chosen)
        self.counters.refreshes += 1
        self.counters.select_s += time.perf_counter() - start

    def after_store(self, layer) -> None:
        """End of ``layer``'s prefill: map the slots now (``_prepare``), while the storage is warm,
        instead of at the first decode step."""
        slots = self.layers.get(layer.layer_idx)
        if slots is not None and slots.width:
            self._prepare(layer, slots)

    def _prepare(self, layer, slots: LayerSlots) -> None:
        """The drift gate's state, and the slot mapping (``_map_slots``) after each store."""
        if self.settings.drift > 0 and slots.anchors is None:  # kept in place (the C routine points at it)
            slots.anchors = torch.zeros(len(slots.seq), slots.group, slots.channels, device=layer.device)
            slots.anchored = torch.zeros(len(slots.seq), dtype=torch.bool, device=layer.device)
        if slots.version != layer.version:
            start = time.perf_counter()
            self._map_slots(layer, slots)
            self.counters.layout_s += time.perf_counter() - start

    def _drift_gate(self, slots: LayerSlots, grouped: torch.Tensor) -> torch.Tensor | None:
        """``(n,)`` bool: sequences whose projected queries moved less than ``drift`` (relative
        Frobenius distance) since their last refill keep their pages this step (None: all refill); the
        others record theirs. The C routine's ``due`` does the same."""
        n = grouped.shape[0]
        self.counters.checked += n
        if self.settings.drift <= 0:
            return None
        projected = project(slots, grouped)
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

    def _native_applies(self, layer, slots: LayerSlots) -> bool:
        """The fused C refill (``heterocache.native``) can serve this layer: a CPU cache whose tier is
        the same memory and dtype, an int8 or fp32 index, and either the block layout or plain
        buckets (no sliding window), whose rows then get unit slots (``_row_layout``);
        ``refill="native"`` raises otherwise."""
        mode = self.settings.refill
        if mode == "torch":
            return False
        why = None
        stored = self.tier.blocks(layer.layer_idx, slots.unit) if isinstance(self.tier, MemoryTier) else None
        mine = (slots.summaries, slots.base, slots.page_positions, slots.basis, slots.channel_scale)
        if layer.device.type != "cpu":
            why = f"the cache is on {layer.device}, the native refill runs on the CPU only"
        elif stored is None or not self.tier.shares_memory_with(layer.device):
            why = f"the {self.tier.name} tier is not host memory the refill can read in place"
        elif stored[0].dtype != layer.dtype or any(b.keys.dtype != layer.dtype for b in layer.buckets):
            why = f"the tier holds {stored[0].dtype}, the cache {layer.dtype}"
        elif not all(t is None or t.is_contiguous() for t in mine):
            why = "the index tensors are not contiguous"
        elif slots.summaries.dtype not in (torch.int8, torch.float32):
            why = f"the native refill reads int8 or float32 indexes, not {slots.summaries.dtype}"
        elif native.refill_library() is None:
            why = native.unavailable_reason()
        elif not slots.blocks and not (self.allow_blocks and slots.every_row and self._row_layout(layer, slots)):
            why = "the layer's storage has sliding-window or non-contiguous buckets"  # (checked before moving)
        if why is not None:
            if mode == "native":
                raise ValueError(f"refill='native' cannot be used here: {why}; use refill='auto' or 'torch'")
            return False
        slots.resident = slots.resident.contiguous()
        sketch = slots.basis is not None
        if not slots.summary_block:  # once: the C routine reads the index in its block layout (same bytes)
            block = native.refill_library().hc_block()
            slots.summaries = to_blocks(slots.summaries, slots.unit if sketch else 1, block)
            slots.summary_block = block
        n, channels = slots.summaries.shape[0], slots.channels
        keys, values = stored
        located = torch.tensor([layer.locate[seq] for seq in slots.seq], dtype=torch.long)  # (n, 2) bucket, row
        seq_bucket, seq_row = located[:, 0].contiguous(), located[:, 1].contiguous()
        counts = slots.counts.to(torch.long).contiguous()
        slots.native_keep = (seq_bucket, seq_row, counts)
        slots.native_job = native.RefillJob(  # pointers into tensors the slots keep alive (updated in place)
            n=n, dim=layer.head_dim, channels=channels, pages=slots.base.shape[1], group=slots.unit if sketch else 1,
            qmat=slots.basis.data_ptr() if sketch else None,
            qscale=None if slots.channel_scale is None else slots.channel_scale.data_ptr(),
            alpha=1.0 if sketch else slots.scaling, summaries=slots.summaries.data_ptr(),
            summary_int8=int(slots.summaries.dtype == torch.int8), base=slots.base.data_ptr(),
            stick=self.settings.stick, page_lse=int(slots.page_lse), resident=slots.resident.data_ptr(),
            width=slots.current.shape[1], counts=counts.data_ptr(), current=slots.current.data_ptr(),
            tier_keys=keys.data_ptr(), tier_values=values.data_ptr(), token_bytes=layer.head_dim * keys.element_size(),
            page_positions=slots.page_positions.data_ptr(), unit=slots.unit, seq_bucket=seq_bucket.data_ptr(),
            seq_row=seq_row.data_ptr(), nbuckets=len(layer.buckets), drift=self.settings.drift,
            anchors=None if slots.anchors is None else slots.anchors.data_ptr(),
            anchored=None if slots.anchored is None else slots.anchored.data_ptr(),
            anchor_rows=0 if slots.anchors is None else slots.anchors.shape[1])
        slots.native_buckets = (ctypes.c_int64 * (4 * len(layer.buckets)))()
        slots.native_job.buckets = ctypes.addressof(slots.native_buckets)
        slots.native_seen = []  # the bucket tensors whose addresses native_buckets holds
        slots.native_ref = ctypes.byref(slots.native_job)
        slots.native_call = native.refill_library().hc_refill
        slots.native_page_bytes = slots.unit * slots.native_job.token_bytes
        return True

    def _row_layout(self, layer, slots: LayerSlots) -> bool:
        """Unit slots for any layout of plain buckets: each sequence's dynamic units move, unit by unit
        in ascending order, to storage slots ``[0, count * unit)`` of its own row (the other entries
        keep their relative order after them); ``current`` records the unit in each unit slot. The
        block layout is this on one uniform bucket (``_layout``); for ragged batches or several
        buckets only the C refill addresses it (as ``row start + k * unit``; its reference there is the
        token-by-token ``_swap`` on the unmoved layout, tests/test_native.py)."""
        if any(b.window is not None or not all(t.is_contiguous() for t in (b.keys, b.values, b.positions))
               or b.positions.dtype != torch.int32 for b in layer.buckets):
            return False
        device = layer.device
        current = torch.zeros(len(slots.seq), max(slots.width, 1), dtype=torch.long, device=device)
        for i, seq in enumerate(slots.seq):
            bucket_index, row = layer.locate[seq]
            bucket = layer.buckets[bucket_index]
            units = torch.nonzero(slots.resident[i]).flatten()  # ascending
            block = units.numel() * slots.unit
            if not block:
                continue
            first = slots.slot_of[i, slots.page_positions[i, units].reshape(-1)]
            other = torch.ones(bucket.capacity, dtype=torch.bool, device=device)
            other[first] = False
            order = torch.cat([first, torch.nonzero(other).flatten()])
            for name in ("keys", "values", "positions"):
                tensor = getattr(bucket, name)
                tensor[row] = tensor[row][order]
            slots.slot_of[i, bucket.positions[row, :block].long()] = torch.arange(block, device=device)
            current[i, : units.numel()] = units
        slots.current = current
        layer.version += 1  # the slots moved; nothing else addresses them (a later store bumps it again)
        slots.version = layer.version
        return True

    def _refill_native(self, layer, slots: LayerSlots, queries: torch.Tensor) -> bool:
        """``choose`` + the page copies in one C call (``heterocache/native/refill.c``) for this step's
        ``queries (B, Hq, q, D)``. False (nothing done) when a bucket's positions are no longer
        contiguous int32 in the block layout (whose PyTorch path then takes over); the row layout has no
        such fallback: an error. Per call this only refreshes the storage addresses when a bucket's
        tensors were replaced (growth, ``sync_positions``), and passes fp32 contiguous queries as they are
        (``(B, Hq, q, D)`` is ``(B * Hkv, group * q, D)`` in memory)."""
        buckets = layer.buckets
        seen = slots.native_seen
        if not (len(seen) == len(buckets) and all(
                b.keys is k and b.values is v and b.positions is p for b, (k, v, p) in zip(buckets, seen))):
            if any(b.positions.dtype != torch.int32 or not b.positions.is_contiguous() for b in buckets):
                if self.settings.refill == "native" or not slots.blocks:
                    raise RuntimeError(f"layer {layer.layer_idx}: the native refill needs contiguous int32 bucket "
                                       "positions; use refill='torch'")
                return False
            if slots.native_job.nbuckets != len(buckets):
                raise RuntimeError(f"layer {layer.layer_idx}: the storage has {len(buckets)} buckets, the native "
                                   f"refill was set up for {slots.native_job.nbuckets}")
            slots.native_buckets[:] = ([b.keys.data_ptr() for b in buckets] + [b.values.data_ptr() for b in buckets]
                                       + [b.positions.data_ptr() for b in buckets] + [b.capacity for b in buckets])
            slots.native_seen = [(b.keys, b.values, b.positions) for b in buckets]
        b, hq, q, d = queries.shape
        n_kv = layer.n_kv_heads
        if not (slots.every_row and queries.dtype == torch.float32 and queries.is_contiguous()):
            queries = queries.reshape(b * n_kv, (hq // n_kv) * q, d)
            if not slots.every_row:
                queries = queries[slots.seq_ids]
            queries = queries.float().contiguous()
        job = slots.native_job
        job.queries, job.rows = queries.data_ptr(), (hq // n_kv) * q
        moved = slots.native_call(slots.native_ref)
        if moved < 0:
            raise RuntimeError(f"layer {layer.layer_idx}: native refill failed ({moved}): the dynamic slots "
                               "no longer pair up with the resident pages")
        self.counters.checked += job.n
        self.counters.skipped += job.skipped
        self.counters.bytes += 2 * moved * slots.native_page_bytes
        self.counters.tokens += moved * slots.unit
        return True

    def _fetch(self, layer, slots: LayerSlots, rows: torch.Tensor, units: torch.Tensor, flat: torch.Tensor):
        """Keys, values ``(m, unit * D)`` on the cache's device of units ``units`` of rows ``rows (m,)``
        (``flat`` = ``rows * U + units``); both swaps fetch through here."""
        unit, d = slots.unit, layer.head_dim
        if self.tier.shares_memory_with(layer.device):  # one indexed copy per tensor, no transfer
            keys = torch.empty((rows.numel(), unit * d), dtype=layer.dtype, device=layer.device)
            values = torch.empty_like(keys)
            self.tier.take(layer.layer_idx, flat, keys, values, unit)
            return keys, values
        in_tier = units[:, None] * unit + torch.arange(unit, device=units.device)
        keys, values = self.tier.gather(layer.layer_idx, rows, in_tier)  # (m, unit, D) on the tier
        return (keys.reshape(-1, unit * d).to(layer.device, non_blocking=True),
                values.reshape(-1, unit * d).to(layer.device, non_blocking=True))

    def _swap_blocks(self, layer, slots: LayerSlots, chosen: torch.Tensor) -> None:
        """Block layout: each chosen unit that is not resident replaces, as one block, a resident unit
        that was not chosen again (per sequence both sets have the same size)."""
        wanted = torch.zeros_like(slots.resident).scatter_(1, chosen, True)
        # row-major order pairs the k-th incoming unit of a sequence with its k-th freed unit slot
        incoming = torch.nonzero(wanted > slots.resident)  # (m, 2): (row, unit)
        if incoming.shape[0]:
            free = torch.nonzero(~wanted.gather(1, slots.current))  # (m, 2): (row, unit slot)
            rows, units, into = incoming[:, 0], incoming[:, 1], free[:, 1]
            in_tier = rows * slots.resident.shape[-1] + units
            keys, values = self._fetch(layer, slots, rows, units, in_tier)
            bucket = layer.buckets[0]
            n, capacity, d = bucket.keys.shape
            unit = slots.unit
            positions = slots.page_positions.view(-1, unit).index_select(0, in_tier)
            flat = rows * (capacity // unit) + into  # unit slots are rows of (n * capacity / unit, unit * D)
            bucket.keys.view(-1, unit * d).index_copy_(0, flat, keys.to(bucket.keys.dtype))
            bucket.values.view(-1, unit * d).index_copy_(0, flat, values.to(bucket.values.dtype))
            bucket.positions.view(-1, unit).index_copy_(0, flat, positions.to(bucket.positions.dtype))
            slots.current[rows, into] = units
            self.counters.bytes += 2 * keys.numel() * keys.element_size()
            self.counters.tokens += positions.numel()
        slots.resident = wanted

    def _swap(self, layer, slots: LayerSlots, chosen: torch.Tensor) -> None:
        """Incremental refill: fetch only the chosen units that are not resident, each into the slots of
        a resident unit that was not chosen again (per sequence both sets have the same size)."""
        wanted = torch.zeros_like(slots.resident).scatter_(1, chosen, True)
        if not slots.uniform:  # a sequence without dynamic slots chose nothing
            wanted &= slots.counts[:, None] > 0
        # row-major order pairs the k-th incoming unit of a sequence with its k-th leaving one
        incoming = torch.nonzero(wanted > slots.resident)  # (m, 2): chosen, not resident yet
        if incoming.shape[0]:
            leaving = torch.nonzero(slots.resident > wanted)  # (m, 2): resident, not chosen again
            rows, units = incoming[:, 0], incoming[:, 1]
            positions = slots.page_positions[rows, units]  # (m, unit)
            out_positions = slots.page_positions[leaving[:, 0], leaving[:, 1]]
            into = slots.slot_of[leaving[:, :1], out_positions]  # (m, unit)
            keys, values = self._fetch(layer, slots, rows, units, rows * slots.resident.shape[-1] + units)
            keys, values = keys.view(-1, layer.head_dim), values.view(-1, layer.head_dim)  # token rows
            seq = slots.seq_ids[rows][:, None].expand_as(positions)
            layer.write_slots(seq.reshape(-1), into.reshape(-1), keys, values, positions.reshape(-1))
            slots.slot_of[rows[:, None], positions] = into
            self.counters.bytes += 2 * keys.numel() * keys.element_size()
            self.counters.tokens += positions.numel()
        slots.resident = wanted

    # --- generate's edits: beam reorders, draft rejection ---------------------------------------
    def select_rows(self, layer, indices: torch.Tensor) -> None:
        """Before ``layer`` keeps batch rows ``indices (B',)`` in that order (beam search): every
        per-sequence tensor of its slots and its slow-tier rows follow; the slots are mapped again
        after the storage was rewritten (``_prepare``), held pages unchanged."""
        slots = self.layers.get(layer.layer_idx)
        if slots is None:
            return
        n_kv = layer.n_kv_heads
        where = {seq: i for i, seq in enumerate(slots.seq)}
        heads = sorted({seq % n_kv for seq in slots.seq})
        seq, source = [], []
        for row, old_row in enumerate(indices.tolist()):
            for head in heads:
                if old_row * n_kv + head in where:  # rows without retrieval (short prompts) have no slots
                    seq.append(row * n_kv + head)
                    source.append(where[old_row * n_kv + head])
        src = torch.tensor(source, dtype=torch.long, device=slots.resident.device)
        before = index_bytes(slots)
        for name in ("resident", "counts", "summaries", "basis", "base", "page_positions", "channel_scale",
                     "anchors", "anchored"):
            value = getattr(slots, name)
            if value is not None:
                setattr(slots, name, value.index_select(0, src).contiguous())
        slots.seq, slots.every_row = seq, seq == list(range(int(indices.shape[0]) * n_kv))
        slots.width = int(slots.counts.max()) if len(seq) else 0
        slots.uniform = bool((slots.counts == slots.width).all())
        slots.slot_of = slots.current = None
        slots.version = -1  # mapped again before the next refill
        slots.native = slots.blocks = False
        self.summary_bytes += index_bytes(slots) - before
        self.tier.select_rows(layer.layer_idx, src)

    def crop(self, layer, length: int) -> None:
        """Before ``layer`` drops its tokens at positions ``>= length``: pages holding such a position are
        never chosen again; a resident one leaves the dynamic slots (its surviving tokens stay, as static
        tokens) and its sequence holds one page less."""
        slots = self.layers.get(layer.layer_idx)
        if slots is None or length >= slots.length:
            return
        gone = (slots.page_positions >= length).any(-1) & torch.isfinite(slots.base)  # (n, P)
        if not bool(gone.any()):
            return
        slots.base.masked_fill_(gone, float("-inf"))
        lost = gone & slots.resident
        if bool(lost.any()):
            slots.resident = slots.resident & ~gone
            slots.counts = slots.counts - lost.sum(-1).to(slots.counts.dtype)
            slots.width = int(slots.counts.max())
            slots.uniform = bool((slots.counts == slots.width).all())
            if slots.anchored is not None:
                slots.anchored &= ~lost.any(-1)  # those sequences refill at their next step
        slots.slot_of = slots.current = None
        slots.version = -1
        slots.native = slots.blocks = False

    def stats(self) -> dict[str, Any]:
        if self.skipped_pending is not None:
            self.counters.skipped += int(self.skipped_pending)
            self.skipped_pending = None
        out: dict[str, Any] = self.counters.as_stats()
        out["device_bytes"] = self.summary_bytes
        out["summary_bytes"] = self.summary_bytes
        if self.tier is not None:
            out[f"{self.tier.name}_bytes"] = out.get(f"{self.tier.name}_bytes", 0) + self.tier.nbytes()
        return out

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()
        self.layers.clear()
