"""The fused C refill (``heterocache/native/refill.c``) of a layer scored by a :class:`SummaryIndex`.

One call per layer and decode step does what ``SummaryIndex.page_scores`` + ``choose_units`` +
``RetrievalEngine.swap_blocks`` do (its reference, tests/test_native.py), the drift gate included:
project the queries, score the int8/fp32 index, select the best pages, pair incoming pages with
freed page slots, copy each page block from a same-memory tier into the bucket. It serves the block
layout and, through :meth:`RetrievalEngine.row_layout`, ragged layouts of plain buckets.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch

from heterocache import native
from heterocache.retrieval.slots import PagedSlots, to_blocks
from heterocache.retrieval.tiers import MemoryTier


@dataclass
class NativeRefill:
    """The C call's argument and the storage addresses it reads, set up once per store."""

    job: Any  # native.RefillJob (pointers into tensors the slots keep alive, updated in place)
    buckets: Any  # ctypes array: keys, values, positions addresses and capacities of the layer's buckets
    ref: Any  # ctypes.byref(job)
    call: Any  # the C function
    page_bytes: int  # bytes of one page's keys (or values)
    keep: tuple = ()  # tensors the job points into, beyond the slots' own
    seen: list = ()  # the bucket tensors ``buckets`` belongs to (refreshed when replaced)


def setup(engine, layer, slots: PagedSlots, mode: str, stick: float, drift: float) -> NativeRefill | None:
    """The C refill for this layer, or None where it cannot serve it (``mode="native"`` raises instead):
    a CPU cache whose tier is the same memory and dtype, an int8 or fp32 index, and either the block
    layout or plain buckets (no sliding window), whose rows then get unit slots (``row_layout``)."""
    if mode == "torch":
        return None
    index = slots.index
    why = None
    tier = engine.tier
    stored = tier.blocks(layer.layer_idx, slots.unit) if isinstance(tier, MemoryTier) else None
    mine = (index.summaries, slots.base, slots.page_positions, index.basis, index.channel_scale)
    if layer.device.type != "cpu":
        why = f"the cache is on {layer.device}, the native refill runs on the CPU only"
    elif stored is None or not tier.shares_memory_with(layer.device):
        why = f"the {tier.name} tier is not host memory the refill can read in place"
    elif stored[0].dtype != layer.dtype or any(b.keys.dtype != layer.dtype for b in layer.buckets):
        why = f"the tier holds {stored[0].dtype}, the cache {layer.dtype}"
    elif not all(t is None or t.is_contiguous() for t in mine):
        why = "the index tensors are not contiguous"
    elif index.summaries.dtype not in (torch.int8, torch.float32):
        why = f"the native refill reads int8 or float32 indexes, not {index.summaries.dtype}"
    elif native.refill_library() is None:
        why = native.unavailable_reason()
    elif not slots.blocks and not (engine.allow_blocks and slots.every_row and engine.row_layout(layer, slots)):
        why = "the layer's storage has sliding-window or non-contiguous buckets"  # (checked before moving)
    if why is not None:
        if mode == "native":
            raise ValueError(f"refill='native' cannot be used here: {why}; use refill='auto' or 'torch'")
        return None
    slots.resident = slots.resident.contiguous()
    sketch = index.basis is not None
    if not index.summary_block:  # once: the C routine reads the index in its block layout (same bytes)
        block = native.refill_library().hc_block()
        index.summaries = to_blocks(index.summaries, index.group, block)
        index.summary_block = block
    keys, values = stored
    located = torch.tensor([layer.locate[seq] for seq in slots.seq], dtype=torch.long)  # (n, 2) bucket, row
    seq_bucket, seq_row = located[:, 0].contiguous(), located[:, 1].contiguous()
    counts = slots.counts.to(torch.long).contiguous()
    job = native.RefillJob(  # pointers into tensors the slots keep alive (updated in place)
        n=index.summaries.shape[0], dim=layer.head_dim, channels=index.channels, pages=slots.base.shape[1],
        group=index.group, qmat=index.basis.data_ptr() if sketch else None,
        qscale=None if index.channel_scale is None else index.channel_scale.data_ptr(),
        alpha=1.0 if sketch else index.scaling, summaries=index.summaries.data_ptr(),
        summary_int8=int(index.summaries.dtype == torch.int8), base=slots.base.data_ptr(),
        stick=stick, page_lse=int(index.page_lse), resident=slots.resident.data_ptr(),
        width=slots.current.shape[1], counts=counts.data_ptr(), current=slots.current.data_ptr(),
        tier_keys=keys.data_ptr(), tier_values=values.data_ptr(), token_bytes=layer.head_dim * keys.element_size(),
        page_positions=slots.page_positions.data_ptr(), unit=slots.unit, seq_bucket=seq_bucket.data_ptr(),
        seq_row=seq_row.data_ptr(), nbuckets=len(layer.buckets), drift=drift,
        anchors=None if slots.anchors is None else slots.anchors.data_ptr(),
        anchored=None if slots.anchored is None else slots.anchored.data_ptr(),
        anchor_rows=0 if slots.anchors is None else slots.anchors.shape[1])
    buckets = (ctypes.c_int64 * (4 * len(layer.buckets)))()
    job.buckets = ctypes.addressof(buckets)
    return NativeRefill(job=job, buckets=buckets, ref=ctypes.byref(job), call=native.refill_library().hc_refill,
                        page_bytes=slots.unit * job.token_bytes, keep=(seq_bucket, seq_row, counts), seen=[])


def run(engine, layer, slots: PagedSlots, queries: torch.Tensor, refill_mode: str) -> bool:
    """One C refill for this step's ``queries (B, Hq, q, D)``. False (nothing done) when a bucket's
    positions are no longer contiguous int32 in the block layout (whose PyTorch path then takes over);
    the row layout has no such fallback: an error. Per call this only refreshes the storage addresses
    when a bucket's tensors were replaced (growth, ``sync_positions``), and passes fp32 contiguous
    queries as they are (``(B, Hq, q, D)`` is ``(B * Hkv, group * q, D)`` in memory)."""
    state = slots.native
    buckets = layer.buckets
    seen = state.seen
    if not (len(seen) == len(buckets) and all(
            b.keys is k and b.values is v and b.positions is p for b, (k, v, p) in zip(buckets, seen))):
        if any(b.positions.dtype != torch.int32 or not b.positions.is_contiguous() for b in buckets):
            if refill_mode == "native" or not slots.blocks:
                raise RuntimeError(f"layer {layer.layer_idx}: the native refill needs contiguous int32 bucket "
                                   "positions; use refill='torch'")
            return False
        if state.job.nbuckets != len(buckets):
            raise RuntimeError(f"layer {layer.layer_idx}: the storage has {len(buckets)} buckets, the native "
                               f"refill was set up for {state.job.nbuckets}")
        state.buckets[:] = ([b.keys.data_ptr() for b in buckets] + [b.values.data_ptr() for b in buckets]
                            + [b.positions.data_ptr() for b in buckets] + [b.capacity for b in buckets])
        state.seen = [(b.keys, b.values, b.positions) for b in buckets]
    b, hq, q, d = queries.shape
    n_kv = layer.n_kv_heads
    if not (slots.every_row and queries.dtype == torch.float32 and queries.is_contiguous()):
        queries = queries.reshape(b * n_kv, (hq // n_kv) * q, d)
        if not slots.every_row:
            queries = queries[slots.seq_ids]
        queries = queries.float().contiguous()
    job = state.job
    job.queries, job.rows = queries.data_ptr(), (hq // n_kv) * q
    moved = state.call(state.ref)
    if moved < 0:
        raise RuntimeError(f"layer {layer.layer_idx}: native refill failed ({moved}): the dynamic slots "
                           "no longer pair up with the resident pages")
    counters = engine.counters
    counters.checked += job.n
    counters.skipped += job.skipped
    engine.count_fetch(2 * moved * state.page_bytes)  # critical, unless engine.prefetching (a layer ahead)
    counters.tokens += moved * slots.unit
    return True
