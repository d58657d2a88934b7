"""HeadwiseCache: a transformers ``Cache`` where every (batch row, layer, KV head) keeps its own
ragged sequence of tokens (keys, values, original positions).

Storage per layer: *buckets* of sequences with similar lengths (attention/ragged.py). A bucket
holds ``keys``/``values (n, capacity, D)``, ``positions (n, capacity)`` and ``lengths (n,)``;
sequence id ``s = b * Hkv + h``. Appends write in place and grow the capacity geometrically
(amortised O(1)). Dropped tokens are never stored: the prefill keeps gathered copies only, so
device bytes fall with ``keep``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from heterocache import compat
from heterocache.attention.ragged import bucket_attention, key_mask, plan_buckets

GROWTH = 1.25
MIN_HEADROOM = 16
PAGE = 16  # capacities are page multiples so a bucket is also a paged pool (attention/triton.py)


def _round_page(n: int) -> int:
    return -(-n // PAGE) * PAGE


@dataclass
class PendingKV:
    """What ``update()`` hands the registered attention function instead of tensors."""

    layer: HeadwiseLayer
    keys: torch.Tensor  # (B, Hkv, q, D) the new tokens
    values: torch.Tensor
    prefill: bool

    @property
    def shape(self):  # some model code reads key.shape[-2] (kv length)
        return self.keys.shape


class Bucket:
    """Sequences ``seq (n,)`` stored densely: ``keys/values (n, cap, D)``, ``positions (n, cap)``."""

    def __init__(self, seq, keys, values, positions, lengths, max_len: int, uniform: bool):
        self.seq = seq
        self.keys, self.values, self.positions = keys, values, positions
        self.lengths = lengths
        self.max_len = max_len  # python int, avoids a device sync per step
        self.uniform = uniform  # all lengths equal

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))

    def reserve(self, extra: int) -> None:
        need = self.max_len + extra
        if need <= self.capacity:
            return
        cap = _round_page(max(need, int(self.capacity * GROWTH) + MIN_HEADROOM))
        n, _, d = self.keys.shape
        for name in ("keys", "values", "positions"):
            old = getattr(self, name)
            new = old.new_zeros((n, cap, d) if old.dim() == 3 else (n, cap))
            new[:, : self.max_len] = old[:, : self.max_len]
            setattr(self, name, new)


class HeadwiseLayer(CacheLayerMixin):
    """One decoder layer's head-wise storage."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, cache: HeadwiseCache, layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.buckets: list[Bucket] = []
        self.seen = 0
        self.prefill_len = 0
        self.batch = self.n_kv_heads = self.head_dim = 0
        self.decode_steps = 0

    # --- transformers layer API -------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.n_kv_heads, _, self.head_dim = key_states.shape
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            config = self.cache.model_config
            if config is not None and config._attn_implementation != "heterocache":
                raise RuntimeError(
                    f"the model's attention implementation is {config._attn_implementation!r}; a HeadwiseCache "
                    "needs 'heterocache' (hc.make_cache sets it; do not switch it back while using this cache)"
                )
        prefill = self.seen == 0
        if not prefill:
            self.append(key_states, value_states)
        self.seen += key_states.shape[-2]
        pending = PendingKV(self, key_states, value_states, prefill)
        return pending, pending

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        return self.seen + compat.query_length(query_length), 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name of get_max_length in transformers < 5.3
        return -1

    def reset(self) -> None:
        self.buckets = []
        self.seen = self.prefill_len = self.decode_steps = 0
        self.is_initialized = False

    def crop(self, max_length: int) -> None:
        """Keep only tokens at positions ``< max_length`` (negative: drop that many from the end)."""
        new_seen = self.seen + max_length if max_length < 0 else min(max_length, self.seen)
        if new_seen >= self.seen:
            return
        self.seen = new_seen
        if not self.buckets:
            return
        keys, values, positions, lengths = self.padded()
        self.store(keys, values, positions, (positions >= 0) & (positions < new_seen))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.buckets:
            return
        keys, values, positions, _ = self.padded()
        idx = indices.to(keys.device)
        self.batch = int(idx.shape[0])
        self.store(keys[idx], values[idx], positions[idx], positions[idx] >= 0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats == 1:
            return
        idx = torch.arange(self.batch).repeat_interleave(repeats)
        self.batch_select_indices(idx)

    # --- storage ------------------------------------------------------------------------------
    def store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              keep: torch.Tensor, headroom: int | None = None) -> None:
        """Replace the storage with the ``keep`` entries (ascending order preserved).

        ``keys/values (B, Hkv, L, D)``, ``positions (B, Hkv, L)`` long, ``keep (B, Hkv, L)`` bool.
        """
        b, h, length, d = keys.shape
        self.batch, self.n_kv_heads, self.head_dim = b, h, d
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        flat_keep = keep.reshape(b * h, length)
        counts = flat_keep.sum(-1)
        count_list = counts.tolist()
        # stable sort puts kept entries first, in their original (ascending) order
        order = torch.sort((~flat_keep).to(torch.int8), dim=-1, stable=True).indices
        flat_k, flat_v = keys.reshape(b * h, length, d), values.reshape(b * h, length, d)
        flat_p = positions.reshape(b * h, length)
        self.buckets = []
        self.locate: list[tuple[int, int]] = [(0, 0)] * (b * h)  # seq id -> (bucket, row)
        opts = self.cache.bucket_options
        for members in plan_buckets(count_list, **opts):
            seq = torch.tensor(members, dtype=torch.long, device=keys.device)
            max_len = max(count_list[i] for i in members)
            room = headroom if headroom is not None else max(MIN_HEADROOM, max_len // 16)
            cap = _round_page(max_len + room)
            idx = order[seq, :max_len]
            bk = flat_k.new_zeros((len(members), cap, d))
            bv = flat_v.new_zeros((len(members), cap, d))
            bp = flat_p.new_full((len(members), cap), -1)
            if max_len:
                bk[:, :max_len] = torch.gather(flat_k[seq], 1, idx[..., None].expand(-1, -1, d))
                bv[:, :max_len] = torch.gather(flat_v[seq], 1, idx[..., None].expand(-1, -1, d))
                bp[:, :max_len] = torch.gather(flat_p[seq], 1, idx)
            lens = counts[seq]
            uniform = len({count_list[i] for i in members}) == 1
            bucket = Bucket(seq, bk, bv, bp, lens, max_len, uniform)
            bucket.is_identity = len(members) == b * h
            for row, member in enumerate(members):
                self.locate[member] = (len(self.buckets), row)
            self.buckets.append(bucket)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append ``q`` new tokens ``(B, Hkv, q, D)`` at positions ``seen..seen+q-1`` to every head."""
        b, h, q, d = key_states.shape
        flat_k = key_states.reshape(b * h, q, d)
        flat_v = value_states.reshape(b * h, q, d)
        new_pos = torch.arange(self.seen, self.seen + q, device=key_states.device)
        for bucket in self.buckets:
            bucket.reserve(q)
            k = flat_k if bucket.is_identity else flat_k[bucket.seq]
            v = flat_v if bucket.is_identity else flat_v[bucket.seq]
            if bucket.uniform:
                start = bucket.max_len
                bucket.keys[:, start:start + q] = k
                bucket.values[:, start:start + q] = v
                bucket.positions[:, start:start + q] = new_pos
            else:
                slots = bucket.lengths[:, None] + torch.arange(q, device=k.device)
                rows = torch.arange(len(bucket.seq), device=k.device)[:, None]
                bucket.keys[rows, slots] = k
                bucket.values[rows, slots] = v
                bucket.positions[rows, slots] = new_pos
            bucket.lengths += q
            bucket.max_len += q

    def padded(self):
        """All sequences as padded tensors (the reference view used by methods and tests).

        Returns ``keys, values (B, Hkv, L, D)``, ``positions (B, Hkv, L)`` (-1 on padding) and
        ``lengths (B, Hkv)``; entries are in ascending position order.
        """
        b, h, d = self.batch, self.n_kv_heads, self.head_dim
        length = max((bk.max_len for bk in self.buckets), default=0)
        keys = torch.zeros((b * h, length, d), dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        positions = torch.full((b * h, length), -1, dtype=torch.long, device=self.device)
        lengths = torch.zeros(b * h, dtype=torch.long, device=self.device)
        for bk in self.buckets:
            n = bk.max_len
            live = torch.arange(n, device=self.device)[None, :] < bk.lengths[:, None]
            keys[bk.seq, :n] = bk.keys[:, :n] * live[..., None]
            values[bk.seq, :n] = bk.values[:, :n] * live[..., None]
            positions[bk.seq, :n] = torch.where(live, bk.positions[:, :n], -1)
            lengths[bk.seq] = bk.lengths
        return (keys.view(b, h, length, d), values.view(b, h, length, d),
                positions.view(b, h, length), lengths.view(b, h))

    def prefix(self, seq_ids: list[int], length: int) -> torch.Tensor:
        """Keys of the first ``length`` slots of the given sequences: ``(n, length, D)`` (zeros past the end)."""
        out = torch.zeros((len(seq_ids), length, self.head_dim), dtype=self.dtype, device=self.device)
        for i, seq in enumerate(seq_ids):
            bucket, row = self.locate[seq]
            bk = self.buckets[bucket]
            n = min(length, bk.max_len)
            out[i, :n] = bk.keys[row, :n]
        return out

    def overwrite_prefix(self, seq_ids: list[int], keys: torch.Tensor, values: torch.Tensor,
                         positions: torch.Tensor, counts: list[int]) -> None:
        """Replace the first ``counts[i]`` slots of sequence ``seq_ids[i]`` (a refreshed prompt part).

        ``keys/values (m, K, D)``, ``positions (m, K)``; lengths and later (decode) slots are unchanged.
        """
        for i, seq in enumerate(seq_ids):
            bucket, row = self.locate[seq]
            bk = self.buckets[bucket]
            n = counts[i]
            bk.keys[row, :n] = keys[i, :n].to(bk.keys.dtype)
            bk.values[row, :n] = values[i, :n].to(bk.values.dtype)
            bk.positions[row, :n] = positions[i, :n]

    def restrict(self, keep: torch.Tensor) -> None:
        """Keep a subset of the stored entries: ``keep (B, Hkv, L)`` over the ``padded()`` layout."""
        keys, values, positions, _ = self.padded()
        self.store(keys, values, positions, keep & (positions >= 0))

    # --- attention ----------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None = None) -> torch.Tensor:
        """Decode attention of ``query (B, Hq, q, D)`` over the stored tokens -> ``(B, q, Hq, D)``."""
        b, hq, q, d = query.shape
        h = self.n_kv_heads
        group = hq // h
        flat_q = query.reshape(b * h, group * q, d)
        out = query.new_empty((b * h, group * q, d)) if len(self.buckets) > 1 else None
        min_pos = None
        if sliding_window and self.seen > sliding_window:
            min_pos = torch.tensor(self.seen - sliding_window, device=query.device)
        for bucket in self.buckets:
            n = bucket.max_len
            mask = key_mask(bucket.lengths, n, q, group, bucket.uniform, min_pos, bucket.positions)
            qb = flat_q if bucket.is_identity else flat_q[bucket.seq]
            if self.cache.kernel == "triton" and min_pos is None:
                res = _triton_bucket(qb, bucket, scaling, q)
            else:
                res = bucket_attention(qb, bucket.keys[:, :n], bucket.values[:, :n], mask, scaling)
            if out is None:
                out = res
            else:
                out[bucket.seq] = res
        out = out.view(b, h, group, q, d).permute(0, 3, 1, 2, 4)
        return out.reshape(b, q, hq, d)

    # --- accounting ---------------------------------------------------------------------------
    def kept_prompt_tokens(self) -> torch.Tensor:
        """``(B, Hkv)`` number of stored tokens with position < prefill length."""
        out = torch.zeros(self.batch * self.n_kv_heads, dtype=torch.long, device=self.device)
        for bk in self.buckets:
            live = torch.arange(bk.capacity, device=self.device)[None, :] < bk.lengths[:, None]
            out[bk.seq] = (live & (bk.positions < self.prefill_len) & (bk.positions >= 0)).sum(-1)
        return out.view(self.batch, self.n_kv_heads)

    def nbytes(self) -> int:
        return sum(bk.nbytes() for bk in self.buckets)

    def used_bytes(self) -> int:
        per_token = 2 * self.head_dim * torch.empty((), dtype=self.dtype).element_size() + 8
        return int(sum(int(bk.lengths.sum()) for bk in self.buckets)) * per_token


def _triton_bucket(query: torch.Tensor, bucket: Bucket, scaling: float, q: int) -> torch.Tensor:
    """The paged Triton kernel over a bucket's storage viewed as pages (no copy)."""
    from heterocache.attention.triton import dense_as_pages, paged_decode_attention

    key_pool, value_pool, table = dense_as_pages(bucket.keys, bucket.values, PAGE)
    return paged_decode_attention(query.contiguous(), key_pool, value_pool, table, bucket.lengths, scaling,
                                  new_tokens=q)


class HeadwiseCache(Cache):
    """A ``Cache`` whose layers keep a ragged, per-(batch, KV head) set of tokens.

    Create it with :func:`heterocache.make_cache`. ``stats()`` reports the measured kept fraction
    and bytes per tier.
    """

    def __init__(self, method, keep: float, n_layers: int, n_kv_heads: int, head_dim: int,
                 bucket_options: dict[str, int] | None = None, geometry: dict[str, int] | None = None):
        self.method, self.keep = method, keep
        self.model_geometry = geometry or {}
        self.model_config = None  # set by make_cache: checked once per layer at first update
        self.kernel = "sdpa"  # or "triton" (paged decode kernel, CUDA; set by make_cache)
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.bucket_options = bucket_options or {}
        self.method_state: dict[str, Any] = {}
        self.prompt_lengths: torch.Tensor | None = None
        self.tiers: dict[str, Any] = {}
        self.counters: dict[str, float] = {}
        super().__init__(layers=[HeadwiseLayer(self, i) for i in range(n_layers)])
        self.has_decode_hook = bool(method.needs_decode_hook)
        self.has_pre_hook = hasattr(method, "before_decode_attention")
        method.setup(self)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.close()
        self.method_state.clear()
        self.prompt_lengths = None
        self.counters.clear()
        self.method.setup(self)

    def close(self) -> None:
        """Stop background work and delete slow-tier copies (files of the disk tier)."""
        runtime = self.method_state.get("runtime")
        if runtime is not None:
            runtime.close()
        for tier in self.tiers.values():
            tier.close() if hasattr(tier, "close") else tier.clear()
        self.tiers.clear()

    def stats(self) -> dict[str, Any]:
        """Measured statistics from the tensors actually held."""
        layers = [layer for layer in self.layers if layer.buckets]
        prompt = int(self.prompt_lengths.sum()) if self.prompt_lengths is not None else 0
        kept = sum(int(layer.kept_prompt_tokens().sum()) for layer in layers)
        denom = prompt * self.n_layers * self.n_kv_heads
        out = {
            "method": self.method.name,
            "keep": self.keep,
            "keep_fraction": kept / denom if denom else 1.0,
            "prompt_tokens": prompt,
            "kept_tokens": kept,
            "seen_tokens": self.get_seq_length(),
            "device_bytes": sum(layer.nbytes() for layer in layers)
            + sum(t.nbytes() for name, t in self.tiers.items() if name == "device"),
            "device_used_bytes": sum(layer.used_bytes() for layer in layers),
            "host_bytes": sum(t.nbytes() for name, t in self.tiers.items() if name == "host"),
            "disk_bytes": sum(t.nbytes() for name, t in self.tiers.items() if name == "disk"),
            "buckets_per_layer": max((len(layer.buckets) for layer in layers), default=0),
        }
        out.update(self.counters)
        return out

