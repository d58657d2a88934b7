"""Vectorised attention over ragged per-head token sets (the default CPU/GPU path).

Sequences (one per (batch row, KV head)) are grouped into *buckets* of similar length; each bucket
is one dense tensor ``(n, capacity, D)`` with a length vector. Attention for a bucket is a single
batched SDPA call in which the ``G`` query heads of a KV head (times the ``q`` new tokens) play the
role of the query length, so GQA needs no ``repeat_kv``. Cost scales with the sum over buckets of
``n * max_len`` (docs/DESIGN.md s.8), not with the longest head of the layer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MIN_GROWTH = 16  # a full bucket grows by as many slots as it has appended since stored, at least this many
MIN_HEADROOM, MAX_HEADROOM = 8, 64  # decode slots reserved at prefill: max_len // 32 within these bounds
PAGE = 16  # Triton backend: capacities are page multiples so a bucket is also a paged pool (attention/triton.py)


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def round_page(n: int) -> int:
    return round_up(n, PAGE)


def prefill_headroom(max_len: int) -> int:
    """Decode slots a bucket reserves when it is stored: ~1/32 of its length, 8 to 64 slots, so a short
    generation needs no reallocation and memory stays within ~3% of what is held (docs/DESIGN.md s.8)."""
    return min(MAX_HEADROOM, max(MIN_HEADROOM, max_len // 32))


class Bucket:
    """Sequences ``seq (n,)`` stored densely: ``keys/values (n, cap, D)``, ``positions (n, cap)``.

    ``lengths (n,)`` live tokens per sequence (left-aligned, ascending positions); ``max_len`` is
    the same maximum as a Python int (no device sync per step); ``uniform``: all lengths equal;
    ``is_identity``: the bucket holds every sequence of the layer in order (no gather needed).

    Ring buckets (``window`` = W, sliding-window layers) never hold more than ``W - 1 + q`` slots
    for ``q``-token forwards (``W`` in decode): they grow like the others up to that size, then a new
    token overwrites the slot with the smallest position (empty slots first, lowest index first), which
    no query can see any more. Occupied slots stay a prefix ``[0, lengths)``; once wrapped the slots
    are no longer in position order (``HeadwiseLayer.padded()`` sorts them).
    """

    def __init__(self, seq, keys, values, positions, lengths, max_len: int, uniform: bool, is_identity: bool,
                 window: int | None = None, align: int = 1):
        self.seq = seq
        self.keys, self.values, self.positions = keys, values, positions
        self.lengths = lengths
        self.max_len = max_len
        self.stored_len = max_len  # max_len when stored: later slots are decode tokens
        self.uniform = uniform
        self.is_identity = is_identity
        self.window = window  # sliding window W: a ring (see ``ring_write``), None: plain append storage
        self.align = align  # capacities are multiples of this (PAGE for the Triton backend, else 1)
        self.page_table = None  # (n, capacity // PAGE) int32, built on first paged use, reset on growth
        self.rows = torch.arange(len(seq), device=keys.device)[:, None]  # (n, 1) row index for scatters
        # Positions of plain (non-ring) buckets are written lazily: appends only record where the
        # unwritten run starts (slot ``pending_slots`` of each row holds position ``pending_position``,
        # the next slots the next positions); ``sync_positions`` fills them before anyone reads.
        self.pending_slots: torch.Tensor | None = None
        self.pending_position = 0
        # (n, 1, 1, cap) additive key mask of single-token decode (0 visible, -inf not): a float mask
        # spares SDPA converting a boolean one every call
        self.visible: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))

    def slot_bytes(self) -> int:
        """Bytes of one slot of one sequence (key + value + position)."""
        return (self.keys.shape[-1] * (self.keys.element_size() + self.values.element_size())
                + self.positions.element_size())

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more tokens per sequence (aligned; rings up to ``W - 1 + extra``).

        A full bucket grows by the number of tokens appended since it was stored (at least
        ``MIN_GROWTH``): the decode part doubles, so ``N`` appends reallocate O(log N) times and the
        copies cost at most about one extra read of the storage per doubling (the attention reads it
        every step), while the spare room stays a small share of a long prompt's storage."""
        need = self.max_len + extra
        if self.window is not None:
            need = min(need, self.window - 1 + extra)
        if need <= self.capacity:
            return
        cap = round_up(max(need, self.capacity + max(MIN_GROWTH, self.max_len - self.stored_len)), self.align)
        if self.window is not None:
            cap = max(need, min(cap, self.window - 1 + extra))
        n, _, d = self.keys.shape
        for name in ("keys", "values", "positions"):
            old = getattr(self, name)
            new = old.new_zeros((n, cap, d)) if old.dim() == 3 else old.new_full((n, cap), -1)
            new[:, : self.max_len] = old[:, : self.max_len]
            setattr(self, name, new)
        self.page_table = None
        self.visible = None

    def realign(self, align: int) -> None:
        """From now on keep the capacity a multiple of ``align`` too (growing it now if needed)."""
        self.align = math.lcm(self.align, align)
        need = round_up(self.capacity, self.align)
        if need > self.capacity:
            self.reserve(need - self.max_len)

    def append(self, keys: torch.Tensor, values: torch.Tensor, first_position: int) -> None:
        """Write ``q`` new tokens ``keys/values (n, q, D)`` at positions ``first_position + t`` after each
        plain sequence's last token (room already reserved). Positions are recorded, not written
        (``sync_positions``); a single-token step also marks the new slots in the cached key mask."""
        q = keys.shape[1]
        if self.pending_slots is None:
            self.pending_slots, self.pending_position = self.lengths.clone(), first_position
        if self.uniform:
            start = self.max_len
            self.keys[:, start:start + q] = keys
            self.values[:, start:start + q] = values
        else:
            slots = self.lengths[:, None] if q == 1 else self.lengths[:, None] + torch.arange(q, device=keys.device)
            self.keys[self.rows, slots] = keys
            self.values[self.rows, slots] = values
            if self.visible is not None and q == 1:
                self.visible[self.rows, 0, 0, slots] = 0.0
            else:
                self.visible = None
        self.lengths += q
        self.max_len += q

    def sync_positions(self) -> None:
        """Fill the positions recorded by ``append`` (``pending_slots``) into ``positions``."""
        if self.pending_slots is None:
            return
        cols = torch.arange(self.capacity, device=self.positions.device)[None, :]
        offset = cols - self.pending_slots[:, None]
        written = (offset >= 0) & (cols < self.lengths[:, None])
        self.positions = torch.where(written, (offset + self.pending_position).to(self.positions.dtype),
                                     self.positions)
        self.pending_slots = None

    def key_mask(self, q: int, group: int):
        """:func:`key_mask` of this plain bucket; for single-token steps an additive mask ``(n, 1, 1, L)``
        kept on the bucket and updated in place by ``append`` instead of rebuilt every step."""
        if self.uniform or q != 1:
            return key_mask(self.lengths, self.max_len, q, group, self.uniform)
        if self.visible is None:
            cols = torch.arange(self.capacity, device=self.lengths.device)
            hidden = (cols[None, :] >= self.lengths[:, None]).view(-1, 1, 1, self.capacity)
            self.visible = torch.zeros(hidden.shape, dtype=self.keys.dtype, device=hidden.device)
            self.visible.masked_fill_(hidden, float("-inf"))
        return self.visible[..., : self.max_len]


def key_mask(lengths: torch.Tensor, max_len: int, q: int, group: int, uniform: bool):
    """Boolean mask ``(n, 1, group*q, max_len)`` or None when every key is visible.

    ``lengths (n,)`` already include the ``q`` new tokens, stored last. Row ``g*q + t`` is query
    token ``t`` of query head ``g``; it sees keys ``j < lengths - q + t + 1``.
    """
    if uniform and q == 1:
        return None
    n = lengths.shape[0]
    device = lengths.device
    cols = torch.arange(max_len, device=device)
    t = torch.arange(q, device=device).repeat(group)  # (group*q,)
    limit = (lengths[:, None] - q + 1) + t[None, :]  # (n, group*q)
    mask = cols[None, None, :] < limit[:, :, None]  # (n, group*q, max_len)
    return mask.view(n, 1, group * q, max_len)


def window_mask(positions: torch.Tensor, first_query: int, q: int, group: int, window: int) -> torch.Tensor:
    """Position-based mask of a ring bucket: ``(n, 1, group*q, L)`` for ``positions (n, L)`` (-1 empty).

    Query token ``t`` (position ``p = first_query + t``) sees stored keys with ``p - window < pos <= p``,
    as transformers' sliding-window mask does; slot order does not matter.
    """
    n, length = positions.shape
    query_pos = first_query + torch.arange(q, device=positions.device).repeat(group)  # (group*q,)
    pos = positions[:, None, :]
    qp = query_pos[None, :, None]
    mask = (pos >= 0) & (pos <= qp) & (pos > qp - window)
    return mask.view(n, 1, group * q, length)


def ring_write(bucket: Bucket, keys: torch.Tensor, values: torch.Tensor, new_positions: torch.Tensor) -> None:
    """Write ``q`` new tokens ``keys/values (n, q, D)`` at ``new_positions (q,)`` into a ring bucket.

    The bucket must already have ``W - 1 + q`` slots or room for ``q`` more (``Bucket.reserve``).
    Each row overwrites its ``q`` slots of lowest key: empty slots (by index) before any stored
    position, then the smallest positions; with ``W - 1 + q`` slots those are never visible again.
    """
    q = keys.shape[1]
    n, cap = bucket.positions.shape
    slots = torch.arange(cap, device=keys.device)
    key = torch.where(bucket.positions < 0, slots - cap, bucket.positions)  # distinct per row
    target = torch.topk(key, q, dim=-1, largest=False, sorted=True).indices  # (n, q), empty slots by index
    rows = torch.arange(n, device=keys.device)[:, None]
    bucket.keys[rows, target] = keys
    bucket.values[rows, target] = values
    bucket.positions[rows, target] = new_positions.to(bucket.positions.dtype).expand(n, q)
    bucket.lengths = (bucket.positions >= 0).sum(-1)
    bucket.max_len = min(cap, bucket.max_len + q)


def bucket_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, scaling: float):
    """One bucket: ``query (n, group*q, D)``, ``keys/values (n, L, D)`` -> ``(n, group*q, D)``."""
    out = F.scaled_dot_product_attention(
        query.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1), attn_mask=mask, scale=scaling
    )
    return out.squeeze(1)


def dense_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """A bucket holding every sequence of the layer at one length, no mask: ``query (B, Hq, q, D)``,
    ``keys/values (B * Hkv, L, D)`` -> ``(B * Hkv, group * q, D)``. The same SDPA call (GQA by
    ``enable_gqa``, the query heads unpacked) that transformers makes over a ``DynamicCache`` in decode,
    so the kernel accumulates in the same order: bf16 FullKV matches it bit for bit."""
    b, hq, q, d = query.shape
    n, length, _ = keys.shape
    h = n // b
    out = F.scaled_dot_product_attention(query, keys.view(b, h, length, d), values.view(b, h, length, d),
                                         scale=scaling, enable_gqa=hq != h)
    return out.reshape(b * h, (hq // h) * q, d)


def plan_buckets(lengths: list[int], max_buckets: int = 4, overhead: int = 256) -> list[list[int]]:
    """Group sequence indices into at most ``max_buckets`` buckets minimising padded work.

    Cost of a bucket = ``n * max_len + overhead`` (``overhead`` ~ the price of one extra kernel
    call in token units). Exact dynamic programme over sorted distinct lengths. Returns lists of
    sequence indices (each ascending), buckets ordered by length.
    """
    if not lengths:
        return []
    arr = np.asarray(lengths, dtype=np.int64)
    distinct, inverse = np.unique(arr, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(distinct))
    u = len(distinct)
    prefix = np.concatenate([[0], np.cumsum(counts)])
    k_max = min(max_buckets, u)
    inf = np.iinfo(np.int64).max // 4
    # best[k][j]: min cost covering distinct[0..j] with k buckets; choice[k][j]: start of last bucket
    best = np.full((k_max + 1, u), inf, dtype=np.int64)
    choice = np.zeros((k_max + 1, u), dtype=np.int64)
    for j in range(u):
        best[1, j] = prefix[j + 1] * distinct[j] + overhead
    for k in range(2, k_max + 1):
        for j in range(k - 1, u):
            starts = np.arange(k - 1, j + 1)
            cost = best[k - 1, starts - 1] + (prefix[j + 1] - prefix[starts]) * distinct[j] + overhead
            pick = int(np.argmin(cost))
            best[k, j], choice[k, j] = cost[pick], starts[pick]
    k_best = int(np.argmin(best[1:, u - 1])) + 1
    bounds = []
    j, k = u - 1, k_best
    while k >= 1:
        start = int(choice[k, j]) if k > 1 else 0
        bounds.append((start, j))
        j, k = start - 1, k - 1
    bounds.reverse()
    groups = []
    for start, end in bounds:
        members = np.nonzero((inverse >= start) & (inverse <= end))[0]
        groups.append(members.tolist())
    return groups


def decode_attention(query: torch.Tensor, buckets: list[Bucket], n_kv_heads: int, scaling: float,
                     backend: str = "sdpa", first_query: int = 0, exact: bool = False) -> torch.Tensor:
    """Decode attention of ``query (B, Hq, q, D)`` over a layer's buckets -> ``(B, q, Hq, D)``.

    The ``q`` new tokens are already stored (last in every plain sequence; anywhere in a ring).
    ``backend``: ``"sdpa"`` (one batched SDPA call per bucket) or ``"triton"`` (the paged kernel over
    the bucket storage viewed as pages, no copy). Ring buckets (sliding-window layers) always use
    SDPA with the position mask of :func:`window_mask`; ``first_query`` is the new tokens' first position.
    ``exact``: a bucket of every sequence at one length runs transformers' own decode call
    (:func:`dense_attention`), bit-identical to a ``DynamicCache`` also in bf16; otherwise the group's
    query rows are packed as one sequence per KV head (:func:`bucket_attention`), which rounds
    differently in bf16 but is ~10x faster there on the CPU (docs/DESIGN.md s.8).
    """
    b, hq, q, d = query.shape
    h = n_kv_heads
    group = hq // h
    flat_q = query.reshape(b * h, group * q, d)
    out = query.new_empty((b * h, group * q, d)) if len(buckets) > 1 else None
    for bucket in buckets:
        n = bucket.max_len
        qb = flat_q if bucket.is_identity else flat_q[bucket.seq]
        if bucket.window is not None:
            mask = window_mask(bucket.positions[:, :n], first_query, q, group, bucket.window)
            res = bucket_attention(qb, bucket.keys[:, :n], bucket.values[:, :n], mask, scaling)
        elif backend == "triton":
            res = _triton_bucket(qb, bucket, scaling, q)
        else:
            mask = bucket.key_mask(q, group)
            if exact and mask is None and bucket.is_identity:  # every sequence, equal lengths: transformers' call
                res = dense_attention(query, bucket.keys[:, :n], bucket.values[:, :n], scaling)
            else:
                res = bucket_attention(qb, bucket.keys[:, :n], bucket.values[:, :n], mask, scaling)
        if out is None:
            out = res
        else:
            out[bucket.seq] = res
    out = out.view(b, h, group, q, d).permute(0, 3, 1, 2, 4)
    return out.reshape(b, q, hq, d)


def _triton_bucket(query: torch.Tensor, bucket: Bucket, scaling: float, q: int) -> torch.Tensor:
    """The paged Triton kernel over a bucket's storage viewed as pages (no copy)."""
    from heterocache.attention.triton import dense_as_pages, paged_decode_attention

    key_pool, value_pool, table = dense_as_pages(bucket.keys, bucket.values, PAGE, bucket.page_table)
    bucket.page_table = table
    return paged_decode_attention(query.contiguous(), key_pool, value_pool, table, bucket.lengths, scaling,
                                  new_tokens=q)
