"""Query-driven retrieval for compressed heads: the default HeteroCache runtime (docs/DESIGN.md s.5).

Every compressed head of a full-attention layer holds on the device, inside its kept-token budget:

- a static part chosen at prefill (sinks, the most recent tokens, the best expected-attention rest);
- ``count`` dynamic slots, refilled before the attention of every decode step with the prompt
  tokens that this step's own queries point at, fetched from the head's full prompt K/V kept in
  the slow tier (host memory or disk);
- a device-resident index of the prompt keys, whose bytes ``method.budgets`` pays out of the
  kept-token budget: ``index="pages"``, the mean key of the non-static tokens of every ``page``
  prompt positions; or ``index="sketch"``, every key projected on the head's top-``rank`` right
  singular vectors (a per-token low-rank sketch, Loki-style), both stored in ``summary_dtype``.

Selection per sequence (batch row x KV head): approximate ``scaling * q . k`` from the index (per
page, or per token), shifted per query row by its maximum, max over the group's query rows, plus
``stick`` for tokens already resident (hysteresis: fewer bytes moved); the best tokens fill the
slots (within a page later tokens first), static tokens and padding excluded. Only tokens not
already resident are fetched and counted as moved.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Any

import torch

from heterocache.methods.heterocache.tiers import Tier, make_tier


@dataclass(frozen=True)
class DynamicSettings:
    index: str  # "pages" (page-mean keys) or "sketch" (per-token rank-`rank` projection)
    page: int  # prompt tokens per summary page
    rank: int  # sketch rank
    stick: float  # log-score bonus of resident tokens
    summary_dtype: torch.dtype  # storage dtype of the page summaries
    offload: str  # slow tier of the full prompt K/V ("host", "disk", "none")
    offload_dir: Any


@dataclass
class DynamicCounters:
    """Reported by ``cache.stats()`` as ``retrieval_<name>``."""

    refreshes: int = 0  # (layer, step) selections
    tokens: int = 0  # tokens fetched that were not resident
    bytes: int = 0  # bytes of keys + values of those tokens
    select_s: float = 0.0  # time spent choosing + fetching + writing (on the decode critical path)

    def as_stats(self) -> dict[str, float]:
        return {f"retrieval_{f.name}": getattr(self, f.name) for f in fields(self)}


@dataclass
class LayerSlots:
    """Dynamic-slot state of one layer: ``n`` sequences (batch row x compressed KV head)."""

    seq: list[int]  # cache sequence ids b * Hkv + h
    resident: torch.Tensor  # (n, T) bool: prompt slots now in the dynamic slots
    counts: torch.Tensor  # (n,) dynamic slots per sequence
    width: int  # max(counts)
    summaries: torch.Tensor  # pages: (n, D, P) mean keys; sketch: (n, r, T) projected keys (summary dtype)
    has_page: torch.Tensor  # pages: (n, P) bool, the page holds a selectable token; sketch: unused
    basis: torch.Tensor | None  # sketch: (n, D, r) fp32 top right singular vectors of the keys
    scaling: float
    base: torch.Tensor  # (n, T) fp32: -inf where not selectable (static, padding), else a recency tie-break
    slots: torch.Tensor | None = None  # (n, width) storage slot of each dynamic slot
    current: torch.Tensor | None = None  # (n, width) prompt position each dynamic slot holds
    seq_ids: torch.Tensor | None = None  # ``seq`` as a tensor
    version: int = -1  # the layer storage version ``slots`` was computed for


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
    """Device cost of one head's page summaries in kept-token units (a token = a key and a value)."""
    return math.ceil(prompt_len / page) * summary_bytes / (2 * kv_bytes)


def sketch_tokens(prompt_len: int, rank: int, head_dim: int, summary_bytes: int, kv_bytes: int) -> float:
    """Device cost of one head's rank-``rank`` sketch (``T x r`` in the summary dtype + an fp32 ``D x r``
    basis) in kept-token units."""
    return (prompt_len * rank * summary_bytes + head_dim * rank * 4) / (2 * head_dim * kv_bytes)


def key_sketch(keys: torch.Tensor, valid: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys (n, T, D)``, ``valid (n, T)`` -> ``(sketch (n, T, r), basis (n, D, r))`` fp32: the keys on
    their top-``rank`` right singular vectors (computed from the valid keys)."""
    masked = keys.float() * valid[..., None]
    basis = torch.linalg.svd(masked, full_matrices=False).Vh[:, :rank].transpose(-1, -2).contiguous()
    return keys.float() @ basis, basis


def selection_base(selectable: torch.Tensor) -> torch.Tensor:
    """``(n, T)`` fp32 added to every step's token scores: -inf where a token may not be fetched, else
    a recency tie-break far below any gap between page scores (within a page, later tokens first)."""
    recency = torch.arange(selectable.shape[-1], device=selectable.device, dtype=torch.float32) * 1e-9
    return recency.expand_as(selectable).masked_fill(~selectable, float("-inf")).contiguous()


def choose(slots: LayerSlots, queries: torch.Tensor, page: int, stick: float) -> torch.Tensor:
    """Prompt positions ``(n, width)`` for the dynamic slots from ``queries (n, R, D)`` (R = group x q)."""
    length = slots.base.shape[-1]
    if slots.basis is not None:  # per-token sketch
        # fp32 compute: a bf16 bmm on CPU costs more than widening the stored index each step
        projected = torch.bmm(queries.float(), slots.basis)  # (n, R, r)
        bound = torch.bmm(projected, slots.summaries.float()) * slots.scaling  # (n, R, T)
        bound = bound + slots.base[:, None]
        bound = bound - bound.amax(-1, keepdim=True).clamp(min=-1e30)
        token = bound.amax(1)
    else:
        bound = torch.bmm(queries.float(), slots.summaries.float()) * slots.scaling  # (n, R, P)
        bound = bound.masked_fill_(~slots.has_page[:, None], float("-inf"))
        bound = bound - bound.amax(-1, keepdim=True).clamp(min=-1e30)
        page_score = bound.amax(1)  # (n, P)
        token = page_score.repeat_interleave(page, dim=-1)[:, :length] + slots.base
    if stick:
        token = token + stick * slots.resident
    chosen = token.topk(slots.width, dim=-1).indices
    if bool((slots.counts < slots.width).any()):  # shorter rows repeat their last real choice
        arange = torch.arange(slots.width, device=chosen.device)[None, :]
        last = chosen.gather(1, (slots.counts - 1).clamp(min=0)[:, None])
        chosen = torch.where(arange < slots.counts[:, None], chosen, last)
    return chosen


class DynamicRetrieval:
    def __init__(self, settings: DynamicSettings):
        self.settings = settings
        self.layers: dict[int, LayerSlots] = {}
        self.tier: Tier | None = None
        self.counters = DynamicCounters()
        self.summary_bytes = 0

    # --- prefill -------------------------------------------------------------------------------
    def watch(self, ctx, heads: list[int], static: torch.Tensor, dynamic: torch.Tensor) -> None:
        """Copy the full prompt K/V of ``heads`` (every batch row) to the tier and summarise them.

        ``static``/``dynamic (B, len(heads), T)``: the prefill's static part and initial dynamic set.
        """
        b, _, length, d = ctx.keys.shape
        if self.tier is None:
            self.tier = make_tier(self.settings.offload, ctx.keys.device, self.settings.offload_dir)
        keys = ctx.keys[:, heads].reshape(-1, length, d)
        self.tier.put(ctx.layer_idx, keys, ctx.values[:, heads].reshape(-1, length, d))
        static = static.reshape(-1, length)
        selectable = ctx.valid[:, None, :].expand(-1, len(heads), -1).reshape(-1, length) & ~static
        basis = None
        if self.settings.index == "sketch":
            valid = ctx.valid[:, None, :].expand(-1, len(heads), -1).reshape(-1, length)
            sketch, basis = key_sketch(keys, valid, self.settings.rank)
            summaries = sketch.to(self.settings.summary_dtype).transpose(1, 2).contiguous()
            has = selectable
            self.summary_bytes += basis.numel() * basis.element_size()
        else:
            means, has = page_means(keys, selectable, self.settings.page)
            summaries = means.to(self.settings.summary_dtype).transpose(1, 2).contiguous()
        self.summary_bytes += summaries.numel() * summaries.element_size()
        counts = dynamic.reshape(-1, length).sum(-1)
        n_kv = ctx.n_kv_heads
        self.layers[ctx.layer_idx] = LayerSlots(
            seq=[row * n_kv + h for row in range(b) for h in heads], resident=dynamic.reshape(-1, length).clone(), counts=counts, width=int(counts.max()),
            summaries=summaries, has_page=has, basis=basis, scaling=ctx.scaling, base=selection_base(selectable),
        )

    # --- decode --------------------------------------------------------------------------------
    def _map_slots(self, layer, slots: LayerSlots) -> None:
        """Storage slot of every dynamic slot, found by position (after each ``store`` of the layer)."""
        found = torch.zeros(len(slots.seq), slots.width, dtype=torch.long, device=layer.device)
        current = torch.zeros_like(found)
        for i, seq in enumerate(slots.seq):
            bucket_index, row = layer.locate[seq]
            bucket = layer.buckets[bucket_index]
            bucket.sync_positions()
            n = int(bucket.lengths[row])
            positions = bucket.positions[row, :n].long()
            inside = (positions >= 0) & (positions < slots.resident.shape[-1])
            mine = torch.nonzero(inside & slots.resident[i, positions.clamp(min=0, max=slots.resident.shape[-1] - 1)])
            mine = mine.flatten()
            count = int(slots.counts[i])
            if len(mine) != count:
                raise RuntimeError(f"layer {layer.layer_idx}: sequence {seq} holds {len(mine)} dynamic tokens, "
                                   f"expected {count} (its storage was changed outside the method)")
            if count:
                found[i, :count] = mine
                found[i, count:] = mine[-1]
                current[i] = positions[found[i]]
        slots.slots, slots.current = found, current
        slots.seq_ids = torch.tensor(slots.seq, device=layer.device)
        slots.version = layer.version

    def before_attention(self, layer, queries: torch.Tensor) -> None:
        """Refill ``layer``'s dynamic slots for this step's ``queries (B, Hq, q, D)``.

        Only the chosen tokens that are not resident are fetched, each into a slot whose token was not
        chosen again; every other slot keeps its token untouched.
        """
        slots = self.layers.get(layer.layer_idx)
        if slots is None or not slots.width:
            return
        start = time.perf_counter()
        if slots.version != layer.version:
            self._map_slots(layer, slots)
        b, hq, q, d = queries.shape
        n_kv = layer.n_kv_heads
        grouped = queries.reshape(b * n_kv, (hq // n_kv) * q, d)[slots.seq]
        chosen = choose(slots, grouped, self.settings.page, self.settings.stick)
        real = torch.arange(slots.width, device=chosen.device)[None, :] < slots.counts[:, None]
        wanted = torch.zeros_like(slots.resident).scatter_(1, chosen, True)
        incoming = ~slots.resident.gather(1, chosen) & real  # chosen, not resident yet
        free = ~wanted.gather(1, slots.current) & real  # slot whose token was not chosen again
        moved = incoming.sum(-1)  # == free.sum(-1) per row
        width = int(moved.max())
        if width:
            take = torch.sort((~incoming).to(torch.int8), dim=-1, stable=True).indices[:, :width]
            into = torch.sort((~free).to(torch.int8), dim=-1, stable=True).indices[:, :width]
            pair = torch.arange(width, device=chosen.device)[None, :] < moved[:, None]
            seq = torch.arange(len(slots.seq), device=chosen.device)[:, None].expand(-1, width)[pair]  # (m,)
            positions = chosen.gather(1, take)[pair]
            into = into[pair]
            keys, values = self.tier.gather(layer.layer_idx, seq, positions[:, None])  # (m, 1, D)
            keys, values = keys[:, 0].to(layer.device, non_blocking=True), values[:, 0].to(layer.device, non_blocking=True)
            layer.write_slots(slots.seq_ids[seq], slots.slots[seq, into], keys, values, positions)
            slots.current[seq, into] = positions
            self.counters.bytes += 2 * positions.numel() * keys.shape[-1] * keys.element_size()
            self.counters.tokens += positions.numel()
        slots.resident = wanted
        self.counters.refreshes += 1
        self.counters.select_s += time.perf_counter() - start

    def stats(self) -> dict[str, Any]:
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
