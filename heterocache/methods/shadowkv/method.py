"""ShadowKV (Sun et al., 2024): low-rank pre-RoPE keys and chunk landmarks on the device, values in
the slow tier (spec/baselines.md s.8); the budget accounting of docs/DESIGN.md s.2."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from heterocache.budget import split_evenly, total_budget
from heterocache.methods.base import PrefillContext, check_choice, check_range
from heterocache.methods.scoring import select_with_forced, topk_mask, window_attention
from heterocache.methods.shadowkv.index import (
    LowRankIndex,
    low_rank_factors,
    min_cosine,
    rotary_inv_freq,
    rotate,
)
from heterocache.retrieval.policy import RetrievingMethod, grouped_queries
from heterocache.retrieval.slots import PagedSlots, choose_units
from heterocache.retrieval.tiers import TIERS, check_directory

PUBLISHED_RANK, PUBLISHED_KEY_DIMS = 160, 1024  # rank 160 for Llama-3-8B's 8 KV heads x 128 key dims
CHUNK = 8  # tokens per chunk (published)
OUTLIERS_PER_1024 = 24  # outlier chunks per 1024 tokens of sparse budget (the CPU class)
METADATA_SHARE = Fraction(1, 2)  # "auto" rank / chunk shrink until the metadata costs at most this share of keep
MAX_CHUNK = 64
MIN_SLOT_CHUNKS = 2  # fewer dynamic chunks than this per head: the prompt is served statically
SINKS = 4  # static fallback of short prompts


@dataclass(frozen=True)
class Plan:
    """How one prompt length is served: per-``[layer][head]`` kept prompt tokens, a role per layer
    (``"retrieve"``, ``"static"``, ``"sliding"``), the resolved rank / chunk, outlier chunks and local
    tokens per retrieving head, and the metadata token-equivalents charged per batch row."""

    budgets: list[list[int]]
    roles: list[str]
    rank: int
    chunk: int
    outliers: int = 0
    local: int = 0
    metadata: int = 0
    slot_chunks: int = 0  # dynamic chunks of the smallest retrieving head budget


@dataclass
class ShadowKV(RetrievingMethod):
    """ShadowKV: top chunks by landmark softmax each step; keys rebuilt from a low-rank SVD, values fetched.

    Per full-attention layer and batch row the device keeps the rank-``r`` SVD of the pre-RoPE keys
    ``(T, Hkv * D)`` (``U_r`` shared by the row's heads, ``S_r V_r^T`` split per head); per head the
    post-RoPE keys are cut into chunks, the last ``local_chunks`` (+ the remainder) and the outlier
    chunks (lowest minimum cosine similarity to their mean) stay exact, the others' values go to the
    slow tier and their mean keys (landmarks) are the index. A step scores chunks by the softmax of
    ``scaling * q . landmark`` per query head, summed over query positions, max over the group; the
    best fill the dynamic slots, their keys rebuilt on the device (only values are moved).

    Budget (docs/DESIGN.md s.2): the factors and landmarks are paid from ``keep`` as token-equivalents
    (a token = ``2 * D`` elements): per retrieving head ``T * r / Hkv + r * D + landmarks * D``
    elements; the rest is the static tokens plus whole chunks of slots (fewer than a chunk per head
    stays unused).

    Parameters
    ----------
    rank : int or "auto"
        SVD rank. ``"auto"``: the published 160 of 1024 key dims scaled to ``Hkv * D`` (30 for 3 x 64),
        halved (alternating with doubling an "auto" ``chunk``, which goes first) until factors +
        landmarks cost at most half of ``keep`` (:meth:`resolved`).
    chunk : int or "auto"
        Tokens per chunk (paper: 8; ``"auto"``: 8, doubled as above, at most 64).
    local_chunks : int
        Last chunks kept exact (paper: 4), plus the alignment remainder.
    outliers : int or "auto"
        Outlier chunks per head. ``"auto"``: the CPU class's 24 per 1024 tokens of dynamic slots, at
        least 1 (the GPU class's fixed 48 chunks would not fit small budgets).
    offload : str
        Slow tier of the values: ``"host"`` (paper), ``"disk"`` or ``"none"`` (device, accuracy only).
    offload_dir : str | None
        Directory of the disk tier (default: a temporary directory).

    Deviations: rank / chunk shrink at small ``keep`` (``stats()`` reports the resolved values);
    prompts whose budget cannot pay for the metadata plus 2 chunks of slots per head keep 4 sinks +
    their most recent tokens (no retrieval); sliding-window layers keep their recent tokens.
    """

    name = "shadowkv"
    description = "ShadowKV: low-rank pre-RoPE keys + landmarks on device, values fetched per step"

    rank: Any = "auto"
    chunk: Any = "auto"
    local_chunks: int = 4
    outliers: Any = "auto"
    offload: str = "host"
    offload_dir: Any = None

    def validate(self) -> None:
        for name, low in (("rank", 1), ("chunk", 1), ("outliers", 0)):
            value = getattr(self, name)
            if value != "auto":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"{name}={value!r} must be 'auto' or an integer")
                check_range(name, value, low)
        check_range("local_chunks", self.local_chunks, 0)
        check_choice("offload", self.offload, TIERS)
        if self.offload_dir is not None:
            if self.offload != "disk":
                raise ValueError(f"offload_dir is only used with offload='disk' (offload={self.offload!r})")
            check_directory(self.offload_dir)

    def bind_model(self, model) -> None:
        self.inv_freq = rotary_inv_freq(model)

    def setup(self, cache) -> None:
        super().setup(cache)
        self.layer_windows, self.head_dim = list(cache.layer_windows), cache.head_dim
        self.plans: dict[tuple[float, int], Plan] = {}
        self.last_plan: Plan | None = None
        self.svd_s = 0.0

    # --- budgets -------------------------------------------------------------------------------
    def resolved(self, keep: float) -> tuple[int, int]:
        """``(rank, chunk)``: "auto" ones shrunk, alternately (chunk doubled first, then rank halved), while
        the per-token cost of factors + landmarks, ``r / (2 Hkv D) + 1 / (2 chunk)`` of a head's KV,
        exceeds ``keep / 2``. Chunk first: measured better on the embedded model at keep 0.25 (rank 30 /
        chunk 16: KL 0.101, top-1 0.828 over the 3 fidelity windows; rank 15 / chunk 8: 0.117 / 0.807)."""
        key_dims = self.n_kv_heads * self.head_dim
        rank = max(1, round(PUBLISHED_RANK * key_dims / PUBLISHED_KEY_DIMS)) if self.rank == "auto" else self.rank
        rank, chunk, turn = min(rank, key_dims), CHUNK if self.chunk == "auto" else self.chunk, 0
        while Fraction(rank, 2 * key_dims) + Fraction(1, 2 * chunk) > Fraction(keep) * METADATA_SHARE:
            can_rank, can_chunk = self.rank == "auto" and rank > 1, self.chunk == "auto" and chunk < MAX_CHUNK
            if not (can_rank or can_chunk):
                break
            if can_chunk and (turn % 2 == 0 or not can_rank):
                chunk *= 2
            else:
                rank = max(1, rank // 2)
            turn += 1
        return rank, chunk

    def split_chunks(self, chunks: int, chunk: int) -> tuple[int, int]:
        """``(slot chunks S, outlier chunks O)`` of a head that pays for ``chunks`` chunks, most slots first."""
        if self.outliers != "auto":
            return max(0, chunks - self.outliers), self.outliers
        slots = chunks
        while slots > 0 and slots + max(1, OUTLIERS_PER_1024 * slots * chunk // 1024) > chunks:
            slots -= 1
        return slots, max(1, OUTLIERS_PER_1024 * slots * chunk // 1024)

    def plan(self, keep: float, prompt_len: int) -> Plan:
        key = (keep, prompt_len)
        if key not in self.plans:
            self.plans[key] = self._plan(keep, prompt_len)
        return self.plans[key]

    def _plan(self, keep: float, prompt_len: int) -> Plan:
        windows, heads, d = self.layer_windows, self.n_kv_heads, self.head_dim
        total = total_budget(keep, prompt_len, len(windows), heads)
        full = [layer for layer, window in enumerate(windows) if window is None]
        share = total // (len(windows) * heads)  # sliding heads: the uniform share (the cache caps it)
        rest = total - share * (len(windows) - len(full)) * heads
        rank, chunk = self.resolved(keep)
        static = ["sliding" if w is not None else "static" for w in windows]
        fallback = Plan(self._budgets(static, share, split_evenly(rest, max(1, len(full) * heads))), static, rank, chunk)
        chunks = prompt_len // chunk
        local_chunks = min(self.local_chunks, chunks)
        local = prompt_len - (chunks - local_chunks) * chunk
        if keep >= 1.0 or not full or prompt_len < rank:
            return fallback
        outliers = 0 if self.outliers == "auto" else self.outliers
        for _ in range(16):  # outliers leave the landmark set: a fixed point of the landmark count
            landmarks = chunks - local_chunks - outliers
            per_head = Fraction(prompt_len * rank, heads) + rank * d + landmarks * d  # elements
            metadata = math.ceil(len(full) * heads * per_head / (2 * d))
            if landmarks < 1 or rest - metadata < 0:
                return fallback
            kept = split_evenly(rest - metadata, len(full) * heads)
            slots, found = self.split_chunks((min(kept) - local) // chunk, chunk)
            if found == outliers:
                break
            outliers = found
        slots = (min(kept) - local) // chunk - outliers
        if slots < MIN_SLOT_CHUNKS or slots >= landmarks:  # no room for retrieval, or every chunk fits
            return fallback
        roles = ["sliding" if w is not None else "retrieve" for w in windows]
        return Plan(self._budgets(roles, share, kept), roles, rank, chunk, outliers, local, metadata, slots)

    def _budgets(self, roles: list[str], share: int, per_head: list[int]) -> list[list[int]]:
        spread = iter(per_head)
        return [[share if role == "sliding" else next(spread) for _ in range(self.n_kv_heads)] for role in roles]

    def budgets(self, keep: float, prompt_len: int, n_layers: int, n_kv_heads: int) -> list[list[int]]:
        return self.plan(keep, prompt_len).budgets

    # --- prefill -------------------------------------------------------------------------------
    def select(self, ctx: PrefillContext) -> torch.Tensor:
        if ctx.keeps_everything():
            return ctx.keep_all()
        plans = [self.plan(ctx.keep, n) for n in ctx.prompt_lengths.tolist()]
        keep = torch.zeros_like(ctx.keep_all())
        last = window_attention(ctx.queries, ctx.keys, 1, ctx.scaling, ctx.valid)[:, :, 0]  # (B, Hq, T)
        scores = last.view(ctx.keys.shape[0], ctx.n_kv_heads, ctx.group, -1).amax(2)  # first pages only
        rows = [row for row, plan in enumerate(plans) if plan.roles[ctx.layer_idx] == "retrieve"
                and _contiguous(ctx.valid[row])]
        for row, plan in enumerate(plans):
            if row not in rows:
                sinks = SINKS if plan.roles[ctx.layer_idx] != "sliding" else 0
                budget = ctx.budget[row:row + 1]
                keep[row] = select_with_forced(scores[row:row + 1], ctx.valid[row:row + 1], budget, sinks, budget)[0]
        if rows:
            keep[rows] = self._page(ctx, rows, [plans[row] for row in rows], scores)
            self.last_plan = plans[rows[0]]
        return keep

    def _page(self, ctx: PrefillContext, rows: list[int], plans: list[Plan], scores: torch.Tensor) -> torch.Tensor:
        """Factor, split and page the retrieving ``rows``; their kept tokens ``(len(rows), Hkv, T)``."""
        b, heads, length, d = ctx.keys.shape
        chunk, rank = plans[0].chunk, plans[0].rank
        statics, units, factors, svs, firsts, lengths = [], [], [], [], [], []
        for row, plan in zip(rows, plans):
            valid = ctx.valid[row]
            first, count = int(valid.nonzero()[0]), int(valid.sum())
            rotary = torch.arange(length, device=valid.device) - first
            keys = ctx.keys[row, :, first:first + count]  # (H, n, D), rotary positions 0..n-1
            pre_rope = rotate(keys, rotary[first:first + count], self._inv_freq(), inverse=True)
            start = time.perf_counter()
            u, sv = low_rank_factors(pre_rope, rank)
            self.svd_s += time.perf_counter() - start  # timed apart (spec s.8: the SVD is the costly part)
            boundary = count - plan.local  # rotary positions below it are chunked (local tail after it)
            static = (valid & (rotary >= boundary))[None].expand(heads, -1).clone()
            if plan.outliers:
                _, low = min_cosine(keys[:, :boundary], chunk)
                outlier = topk_mask(-low[None], plan.outliers, torch.ones_like(low[:1], dtype=torch.bool))[0]
                static[:, first:first + boundary] |= outlier.repeat_interleave(chunk, dim=1)
            statics.append(static)
            units.append((ctx.budget[row] - plan.local - plan.outliers * chunk) // chunk)
            factors.append(u)
            svs.append(sv)
            firsts.append(first)
            lengths.append(count)
        static = torch.stack(statics)  # (R, H, T)
        seq = [row * heads + h for row in rows for h in range(heads)]
        selectable = (ctx.valid[rows][:, None] & ~static).reshape(-1, length)
        slots, extra, paged_keys = self.engine.page(
            ctx.layer_idx, ctx.keys[rows].reshape(-1, length, d), ctx.values[rows].reshape(-1, length, d), selectable,
            scores[rows].reshape(-1, length), torch.cat(units), chunk, seq, seq == list(range(b * heads)), ctx.group,
            ctx.scaling, store_keys=False)
        device = ctx.keys.device
        offsets = torch.tensor([0, *lengths], device=device).cumsum(0)[:-1]
        landmarks = paged_keys.float().view(len(seq), -1, chunk, d).mean(2)
        slots.index = LowRankIndex(
            landmarks.to(ctx.keys.dtype), torch.cat(factors).to(ctx.keys.dtype), offsets.repeat_interleave(heads),
            torch.tensor(lengths, device=device).repeat_interleave(heads), torch.cat(svs).to(ctx.keys.dtype),
            torch.tensor(firsts, device=device).repeat_interleave(heads), self._inv_freq(), ctx.scaling, ctx.group,
            slots)
        return (slots.held_tokens() | extra).view(len(rows), heads, length) | static

    @property
    def page(self) -> int:
        """Tokens per engine page: the chunk of the last prompt served with retrieval (8 before any)."""
        plan = getattr(self, "last_plan", None)
        return plan.chunk if plan is not None else CHUNK

    def _inv_freq(self) -> torch.Tensor | None:
        return getattr(self, "inv_freq", None)

    # --- decode --------------------------------------------------------------------------------
    def wanted(self, layer, slots: PagedSlots, queries: torch.Tensor) -> torch.Tensor:
        scores = slots.index.page_scores(grouped_queries(queries, layer.n_kv_heads, slots), slots.base)
        return choose_units(slots, scores)

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        plan = self.last_plan
        out.update(shadowkv_rank=plan.rank if plan else None, shadowkv_chunk=plan.chunk if plan else None,
                   shadowkv_outlier_chunks=plan.outliers if plan else None,
                   shadowkv_local_tokens=plan.local if plan else None,
                   shadowkv_slot_chunks=plan.slot_chunks if plan else None,
                   shadowkv_metadata_tokens=plan.metadata if plan else 0, shadowkv_svd_s=self.svd_s)
        return out


def _contiguous(valid: torch.Tensor) -> bool:
    """The row's valid slots form one run (left or right padding): rotary position = slot - first."""
    idx = valid.nonzero().flatten()
    return idx.numel() > 0 and int(idx[-1] - idx[0]) + 1 == idx.numel()
