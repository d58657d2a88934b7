"""The retrieval engine every retrieving method configures (docs/DESIGN.md s.5).

It owns the slow tier (``tiers.py``: host memory, disk, or the device) and, per layer, the
:class:`~heterocache.retrieval.slots.PagedSlots`: the paged prompt copy and which pages sit in each
sequence's dynamic slots. Policies (HeteroCache, Quest, ShadowKV, OmniKV) only decide *which* pages
a step wants (``choose``); the engine moves them: only the wanted pages that are not resident are
fetched, each as one block over the slots of a resident page that is not wanted any more, and every
byte that crosses the tier boundary is counted.

Layouts: when the layer is one plain bucket of equal sequences (the usual case) the dynamic slots
are a *block layout* (page slot k = storage slots [k * unit, (k + 1) * unit), capacities kept unit
multiples): a step writes its pages with one ``index_copy_`` per tensor (:meth:`swap_blocks`), or
on the CPU the whole refill is one C call (``native_refill.py``, HeteroCache's index only). Ragged
layouts swap token by token (:meth:`swap_tokens`), the reference the block path is tested against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any

import torch

from heterocache.methods.scoring import topk_mask
from heterocache.retrieval.slots import PagedSlots, page_layout
from heterocache.retrieval.tiers import Tier, make_tier


@dataclass
class Counters:
    """Reported by ``cache.stats()`` as ``retrieval_<name>``."""

    refreshes: int = 0  # (layer, step) selections
    tokens: int = 0  # tokens fetched that were not resident
    bytes: int = 0  # bytes of keys + values of those tokens read from the tier
    critical_bytes: int = 0  # of which fetched for an attention that waits for them (this step, this layer)
    prefetched_bytes: int = 0  # of which issued at least one layer before the attention that uses them
    checked: int = 0  # (layer, sequence, step) refill decisions
    skipped: int = 0  # of which not refilled (HeteroCache's drift gate)
    select_s: float = 0.0  # time spent choosing + fetching + writing (on the decode critical path)
    layout_s: float = 0.0  # mapping the slots after each store (once per prefill, at its end)

    def as_stats(self) -> dict[str, float]:
        return {f"retrieval_{f.name}": getattr(self, f.name) for f in fields(self)}


class RetrievalEngine:
    """Slow tier + per-layer dynamic slots; see the module docstring."""

    def __init__(self, offload: str = "host", offload_dir: Any = None):
        self.offload, self.offload_dir = offload, offload_dir
        self.layers: dict[int, PagedSlots] = {}
        self.tier: Tier | None = None
        self.counters = Counters()
        self.allow_blocks = True  # False: always the token-by-token swap (tests compare the two)
        self.prefetching = False  # set while a policy refills a layer ahead: its bytes count as prefetched
        # block refills without a host sync (retrieval/syncfree.py): None = on CUDA devices; True / False force it
        self.sync_free: bool | None = None
        self.pending: torch.Tensor | None = None  # (3,) tokens, critical, prefetched bytes counted on the device
        self.copy_stream = None  # CUDA: the stream prefetches are copied on (created at the first one)
        self.fetched: dict[int, Any] = {}  # layer -> the CUDA event its prefetch completes

    # --- prefill -------------------------------------------------------------------------------
    def page(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, selectable: torch.Tensor,
             scores: torch.Tensor, units: torch.Tensor, unit: int, seq: list[int], every_row: bool,
             group: int, scaling: float, store_keys: bool = True) -> tuple[PagedSlots, torch.Tensor, torch.Tensor]:
        """Page the ``selectable (n, T)`` prompt tokens of ``keys/values (n, T, D)`` into the tier and set
        up the layer's slots with ``units (n,)`` pages each, the first ones the best by prefill
        ``scores (n, T)`` (replaced at the first decode step).

        A remainder token (fewer than ``unit`` left) is kept statically and costs its sequence a page of
        slots, on every row alike (equal rows keep the block layout). Returns ``(slots, extra (n, T),
        paged_keys (n, P * unit, D))``: ``extra`` are the remainder tokens to keep statically.
        ``store_keys=False``: the tier keeps the values only (ShadowKV rebuilds keys on the device).
        ``seq``: the cache sequence ids of the ``n`` rows; ``every_row``: they are all of the layer's, in order.
        """
        if self.tier is None:
            self.tier = make_tier(self.offload, keys.device, self.offload_dir)
        n, length, d = keys.shape
        spare = units > 0
        positions, real, extra = page_layout(selectable, scores.float(), unit, spare)
        if bool(extra.any()):
            units = torch.where(spare, units - 1, units)
        pages = real.shape[1]
        flat = positions.view(n, pages * unit)
        paged_keys = keys.gather(1, flat[..., None].expand(-1, -1, d))
        paged_values = values.gather(1, flat[..., None].expand(-1, -1, d))
        self.tier.put(layer_idx, paged_keys if store_keys else None, paged_values)
        page_score = scores.float().gather(1, flat).view(n, pages, unit).sum(-1)
        resident = topk_mask(page_score[None], units[None], real[None])[0]
        units = resident.sum(-1)  # fewer than asked where a row has fewer selectable pages
        base = torch.zeros(n, pages, device=real.device).masked_fill(~real, float("-inf"))
        slots = PagedSlots(seq=seq, resident=resident, counts=units, width=int(units.max()) if n else 0, base=base,
                           length=length, page_positions=positions, unit=unit, group=group, scaling=scaling,
                           every_row=every_row)
        self.layers[layer_idx] = slots
        return slots, extra, paged_keys

    # --- slot mapping (once per store) ---------------------------------------------------------
    def prepare(self, layer, slots: PagedSlots) -> bool:
        """Map the slots after each store of the layer (``map_slots``); True when it ran."""
        if slots.version == layer.version:
            return False
        start = time.perf_counter()
        self.map_slots(layer, slots)
        self.counters.layout_s += time.perf_counter() - start
        return True

    def map_slots(self, layer, slots: PagedSlots) -> None:
        """Storage slot of every held prompt position, found by position; then the block layout when it
        applies (:meth:`block_layout`)."""
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
        slots.blocks = self.allow_blocks and self.block_layout(layer, slots)

    def block_layout(self, layer, slots: PagedSlots) -> bool:
        """Block layout, when the layer is one plain bucket of every sequence with ``width`` pages each:
        each sequence's dynamic tokens move to slots ``[0, width * unit)``, page by page (the other
        entries keep their relative order after them; :meth:`row_layout`), with the capacity kept a
        multiple of ``unit``, so a step replaces whole pages with one indexed copy per tensor on a
        ``(n * capacity / unit, unit * D)`` view (:meth:`swap_blocks`)."""
        if not (slots.every_row and slots.uniform and len(layer.buckets) == 1):
            return False
        bucket = layer.buckets[0]
        if bucket.window is not None or not bucket.is_identity or len(slots.seq) != bucket.keys.shape[0]:
            return False
        bucket.realign(slots.unit)  # now and after any growth, unit slots are rows of (n * capacity / unit, unit * D)
        return self.row_layout(layer, slots)  # needs contiguous storage (the unit-slot views do too)

    def row_layout(self, layer, slots: PagedSlots) -> bool:
        """Unit slots for any layout of plain buckets: each sequence's dynamic pages move, in ascending
        order, to storage slots ``[0, count * unit)`` of its own row (the other entries keep their
        relative order after them); ``current`` records the page in each unit slot. The block layout is
        this on one uniform bucket; for ragged batches or several buckets only the C refill addresses
        it (its reference there is the token-by-token :meth:`swap_tokens` on the unmoved layout)."""
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

    # --- a step's refill -----------------------------------------------------------------------
    def swap(self, layer, slots: PagedSlots, chosen: torch.Tensor) -> None:
        """Make the pages ``chosen (n, width)`` resident (block layout, else token by token)."""
        if slots.blocks:
            slots.native = None  # the torch path replaces ``resident``: the C call's pointers are stale
            path = self.sync_free_path(layer, slots)
            if path is not None:
                self.swap_blocks_sync_free(layer, slots, chosen, path)
            else:
                self.swap_blocks(layer, slots, chosen)
        else:
            self.swap_tokens(layer, slots, chosen)

    def fetch(self, layer, slots: PagedSlots, rows: torch.Tensor, units: torch.Tensor, flat: torch.Tensor):
        """Keys, values ``(m, unit * D)`` on the cache's device of pages ``units`` of rows ``rows (m,)``
        (``flat`` = ``rows * P + units``); both swaps fetch through here. An index with a
        ``rebuild_keys(rows, units) -> (m, unit, D)`` method (ShadowKV's low-rank keys) makes the keys on the
        device: the tier then holds values only (``page(store_keys=False)``)."""
        unit, d = slots.unit, layer.head_dim
        rebuild = getattr(slots.index, "rebuild_keys", None)  # keys made on the device (ShadowKV)
        if self.tier.shares_memory_with(layer.device):  # one indexed copy per tensor, no transfer
            values = torch.empty((rows.numel(), unit * d), dtype=layer.dtype, device=layer.device)
            keys = None if rebuild is not None else torch.empty_like(values)
            self.tier.take(layer.layer_idx, flat, keys, values, unit)
        else:
            in_tier = units[:, None] * unit + torch.arange(unit, device=units.device)
            keys, values = self.tier.gather(layer.layer_idx, rows, in_tier)  # (m, unit, D) on the tier
            values = values.reshape(-1, unit * d).to(layer.device, non_blocking=True)
            keys = None if rebuild is not None else keys.reshape(-1, unit * d).to(layer.device, non_blocking=True)
        if rebuild is not None:
            keys = rebuild(rows, units).reshape(-1, unit * d).to(layer.dtype)
        return keys, values

    def count_fetch(self, nbytes: int, prefetched: bool = False) -> None:
        """Count ``nbytes`` read from the tier: on the critical path (the default: a refill before the
        attention that needs it) or ``prefetched`` (issued at least one layer earlier; also while
        ``self.prefetching`` is set, by a policy that refills a layer ahead)."""
        self.counters.bytes += nbytes
        if prefetched or self.prefetching:
            self.counters.prefetched_bytes += nbytes
        else:
            self.counters.critical_bytes += nbytes

    def fetched_bytes(self, slots: PagedSlots, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Bytes read from the tier for a fetch (rebuilt keys do not cross it)."""
        moved = values.numel() * values.element_size()
        return moved if hasattr(slots.index, "rebuild_keys") else moved + keys.numel() * keys.element_size()

    def swap_blocks(self, layer, slots: PagedSlots, chosen: torch.Tensor) -> None:
        """Block layout: each chosen page that is not resident replaces, as one block, a resident page
        that was not chosen again (per sequence both sets have the same size)."""
        wanted = torch.zeros_like(slots.resident).scatter_(1, chosen, True)
        # row-major order pairs the k-th incoming page of a sequence with its k-th freed unit slot
        incoming = torch.nonzero(wanted > slots.resident)  # (m, 2): (row, page)
        if incoming.shape[0]:
            free = torch.nonzero(~wanted.gather(1, slots.current))  # (m, 2): (row, unit slot)
            rows, units, into = incoming[:, 0], incoming[:, 1], free[:, 1]
            in_tier = rows * slots.resident.shape[-1] + units
            keys, values = self.fetch(layer, slots, rows, units, in_tier)
            bucket = layer.buckets[0]
            n, capacity, d = bucket.keys.shape
            unit = slots.unit
            positions = slots.page_positions.view(-1, unit).index_select(0, in_tier)
            flat = rows * (capacity // unit) + into  # unit slots are rows of (n * capacity / unit, unit * D)
            bucket.keys.view(-1, unit * d).index_copy_(0, flat, keys.to(bucket.keys.dtype))
            bucket.values.view(-1, unit * d).index_copy_(0, flat, values.to(bucket.values.dtype))
            bucket.positions.view(-1, unit).index_copy_(0, flat, positions.to(bucket.positions.dtype))
            slots.current[rows, into] = units
            self.count_fetch(self.fetched_bytes(slots, keys, values))
            self.counters.tokens += positions.numel()
        slots.resident = wanted

    def sync_free_path(self, layer, slots: PagedSlots) -> str | None:
        """``"triton"`` / ``"torch"``: how :meth:`swap_blocks_sync_free` copies for this layer, or None (the
        ``nonzero`` pairing of :meth:`swap_blocks`). Used on CUDA (``sync_free=None``) or when forced; needs
        a memory tier of the cache's dtype and keys stored in it (not ShadowKV's rebuilt ones). On CUDA
        the copy is the Triton kernel (the tier is pinned host memory); the PyTorch reference serves a
        tier in the cache's own memory (the CPU, ``offload="none"``)."""
        wanted = self.sync_free if self.sync_free is not None else layer.device.type == "cuda"
        tier = self.tier
        if not wanted or not hasattr(tier, "blocks") or hasattr(slots.index, "rebuild_keys"):
            return None
        keys, values = tier.layers[layer.layer_idx]
        bucket = layer.buckets[0]
        if values.dtype != bucket.values.dtype or keys.shape[-1] != values.shape[-1]:
            return None
        from heterocache.attention.triton import triton_available

        if triton_available(layer.device) and (layer.device.type == "cuda") == tier.pin:
            return "triton"
        return "torch" if tier.shares_memory_with(layer.device) else None

    def swap_blocks_sync_free(self, layer, slots: PagedSlots, chosen: torch.Tensor, path: str) -> None:
        """:meth:`swap_blocks` with fixed-shape pairing and one masked copy (``retrieval/syncfree.py``;
        ``path`` from :meth:`sync_free_path`): no host synchronisation; the bytes are counted on the
        device (:meth:`fold`)."""
        from heterocache.retrieval import syncfree

        wanted, src, dst, valid = syncfree.pair_blocks(slots.resident, slots.current, chosen)
        unit, d = slots.unit, layer.head_dim
        bucket = layer.buckets[0]
        tier_keys, tier_values = self.tier.blocks(layer.layer_idx, unit)
        args = (tier_keys, tier_values, slots.page_positions.view(-1, unit), bucket.keys.view(-1, unit * d),
                bucket.values.view(-1, unit * d), bucket.positions.view(-1, unit), src, dst, valid)
        if path == "triton":
            if self.prefetching and layer.device.type == "cuda":  # a layer ahead: on the copy stream
                self._on_copy_stream(layer.layer_idx, lambda: syncfree.fetch_blocks(*args), (src, dst, valid))
            else:
                syncfree.fetch_blocks(*args)
        else:
            syncfree.fetch_blocks_reference(*args)
        slots.current.scatter_(1, dst, torch.where(valid, src, slots.current.gather(1, dst)))
        slots.resident = wanted
        moved = valid.sum()
        page_bytes = unit * d * (tier_keys.element_size() + tier_values.element_size())
        column = 2 if self.prefetching else 1
        if self.pending is None:
            self.pending = torch.zeros(3, dtype=torch.long, device=moved.device)
        self.pending[0] += moved * unit
        self.pending[column] += moved * page_bytes

    def _on_copy_stream(self, layer_idx: int, launch, temporaries) -> None:
        """Run ``launch`` on the engine's CUDA copy stream after what the current stream has queued (the
        pairing), so the fetch overlaps the compute until :meth:`wait` for ``layer_idx``."""
        main = torch.cuda.current_stream()
        if self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(device=main.device)
        self.copy_stream.wait_stream(main)
        with torch.cuda.stream(self.copy_stream):
            launch()
        for tensor in temporaries:  # freed by the main stream only after the copy stream used them
            tensor.record_stream(self.copy_stream)
        done = torch.cuda.Event()
        done.record(self.copy_stream)
        self.fetched[layer_idx] = done

    def wait(self, layer_idx: int) -> None:
        """Before ``layer_idx``'s attention: the current stream waits for its prefetch (no host sync)."""
        done = self.fetched.pop(layer_idx, None) if self.fetched else None
        if done is not None:
            torch.cuda.current_stream().wait_event(done)

    def fold(self) -> None:
        """Add the device-side counts of :meth:`swap_blocks_sync_free` to the counters (one sync)."""
        if self.pending is not None:
            tokens, critical, prefetched = (int(v) for v in self.pending.tolist())
            self.counters.tokens += tokens
            self.counters.critical_bytes += critical
            self.counters.prefetched_bytes += prefetched
            self.counters.bytes += critical + prefetched
            self.pending = None

    def swap_tokens(self, layer, slots: PagedSlots, chosen: torch.Tensor) -> None:
        """Incremental refill: fetch only the chosen pages that are not resident, each into the slots of
        a resident page that was not chosen again (per sequence both sets have the same size)."""
        wanted = torch.zeros_like(slots.resident).scatter_(1, chosen, True)
        if not slots.uniform:  # a sequence without dynamic slots chose nothing
            wanted &= slots.counts[:, None] > 0
        # row-major order pairs the k-th incoming page of a sequence with its k-th leaving one
        incoming = torch.nonzero(wanted > slots.resident)  # (m, 2): chosen, not resident yet
        if incoming.shape[0]:
            leaving = torch.nonzero(slots.resident > wanted)  # (m, 2): resident, not chosen again
            rows, units = incoming[:, 0], incoming[:, 1]
            positions = slots.page_positions[rows, units]  # (m, unit)
            out_positions = slots.page_positions[leaving[:, 0], leaving[:, 1]]
            into = slots.slot_of[leaving[:, :1], out_positions]  # (m, unit)
            keys, values = self.fetch(layer, slots, rows, units, rows * slots.resident.shape[-1] + units)
            nbytes = self.fetched_bytes(slots, keys, values)
            keys, values = keys.view(-1, layer.head_dim), values.view(-1, layer.head_dim)  # token rows
            seq = slots.seq_ids[rows][:, None].expand_as(positions)
            layer.write_slots(seq.reshape(-1), into.reshape(-1), keys, values, positions.reshape(-1))
            slots.slot_of[rows[:, None], positions] = into
            self.count_fetch(nbytes)
            self.counters.tokens += positions.numel()
        slots.resident = wanted

    # --- generate's edits: beam reorders, draft rejection ---------------------------------------
    def select_rows(self, layer, indices: torch.Tensor) -> torch.Tensor | None:
        """Before ``layer`` keeps batch rows ``indices (B',)`` in that order (beam search): every
        per-sequence tensor of its slots (and of its index) and its tier rows follow; the slots are
        mapped again after the storage was rewritten (:meth:`prepare`), held pages unchanged. Returns
        the source row of every new sequence ``(n',)`` (None: the layer does not retrieve)."""
        slots = self.layers.get(layer.layer_idx)
        if slots is None:
            return None
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
        for name in ("resident", "counts", "base", "page_positions", "anchors", "anchored"):
            value = getattr(slots, name)
            if value is not None:
                setattr(slots, name, value.index_select(0, src).contiguous())
        if slots.index is not None:
            slots.index.select_rows(src)
        slots.seq, slots.every_row = seq, seq == list(range(int(indices.shape[0]) * n_kv))
        self._changed(slots)
        self.tier.select_rows(layer.layer_idx, src)
        return src

    def crop(self, layer, length: int) -> None:
        """Before ``layer`` drops its tokens at positions ``>= length``: pages holding such a position are
        never chosen again; a resident one leaves the dynamic slots (its surviving tokens stay, as static
        tokens) and its sequence holds one page less."""
        slots = self.layers.get(layer.layer_idx)
        if slots is None or length >= slots.length:
            return
        gone = (slots.page_positions >= length).any(-1) & slots.real_pages()  # (n, P)
        if not bool(gone.any()):
            return
        slots.base.masked_fill_(gone, float("-inf"))
        lost = gone & slots.resident
        if bool(lost.any()):
            slots.resident = slots.resident & ~gone
            slots.counts = slots.counts - lost.sum(-1).to(slots.counts.dtype)
            if slots.anchored is not None:
                slots.anchored &= ~lost.any(-1)  # those sequences refill at their next step
        self._changed(slots)

    @staticmethod
    def _changed(slots: PagedSlots) -> None:
        """Per-sequence state was edited: recount, and map the slots again before the next refill."""
        slots.width = int(slots.counts.max()) if len(slots.seq) else 0
        slots.uniform = bool((slots.counts == slots.width).all())
        slots.slot_of = slots.current = None
        slots.version = -1
        slots.native = None
        slots.blocks = False

    # --- accounting ----------------------------------------------------------------------------
    def index_bytes(self) -> int:
        """Device bytes of every layer's index."""
        return sum(slots.index.nbytes() for slots in self.layers.values() if slots.index is not None)

    def stats(self, device_bytes: int = 0) -> dict[str, Any]:
        """The counters as ``retrieval_*``, the method's own ``device_bytes`` and the tier's bytes under
        its name (``host_bytes``, ``disk_bytes``; a device tier, ``offload="none"``, adds to ``device_bytes``)."""
        self.fold()
        out: dict[str, Any] = self.counters.as_stats()
        out["device_bytes"] = device_bytes
        if self.tier is not None:
            name = f"{self.tier.name}_bytes"
            out[name] = out.get(name, 0) + self.tier.nbytes()
            if self.tier.name == "device":  # the offload="none" emulation: device bytes not paid from keep
                out["device_tier_bytes"] = self.tier.nbytes()
        return out

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()
        self.layers.clear()
