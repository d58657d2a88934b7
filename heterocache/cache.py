"""HeadwiseCache: a transformers ``Cache`` where every (batch row, layer, KV head) keeps its own
ragged sequence of tokens (keys, values, original positions), and that drives its method.

Storage per layer: *buckets* of sequences with similar lengths (``attention.ragged.Bucket``). A
bucket holds ``keys``/``values (n, capacity, D)``, ``positions (n, capacity)`` and ``lengths (n,)``;
sequence id ``s = b * Hkv + h``. Appends write in place and grow the capacity geometrically
(amortised O(1); headroom and growth in ``attention/ragged.py``, docs/DESIGN.md s.8). Dropped tokens are never stored: the prefill keeps gathered copies only, so
device bytes fall with ``keep``. Sliding-window layers (``window`` = W) store rings: at most
``W - 1 + q`` slots per head for ``q``-token forwards (``W`` in decode), new tokens overwrite the
oldest ones (docs/DESIGN.md s.2-3).

The step protocol (docs/DESIGN.md s.3) lives in :meth:`HeadwiseCache.compress` (end of a layer's
prefill) and :meth:`HeadwiseCache.decode` (one decode attention); ``hf.py`` only routes the model's
attention calls here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from heterocache.attention import decode_attention, plan_buckets
from heterocache.attention.ragged import PAGE, Bucket, prefill_headroom, ring_write, round_up
from heterocache.budget import budget_table, cap_sliding, sliding_cap
from heterocache.methods.base import DecodeContext, PrefillContext


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


def _query_length(cache_position_or_length: torch.Tensor | int) -> int:
    """New tokens from what ``get_mask_sizes`` receives: ``cache_position (q,)`` (transformers 5.2) or
    the query length itself (newer 5.x)."""
    if isinstance(cache_position_or_length, torch.Tensor):
        return int(cache_position_or_length.shape[0])
    return int(cache_position_or_length)


class HeadwiseLayer(CacheLayerMixin):
    """One decoder layer's head-wise storage."""

    is_compileable = False
    is_croppable = True

    def __init__(self, cache: HeadwiseCache, layer_idx: int, window: int | None = None):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.window = window  # sliding window W of the layer's attention, None: full attention
        self.is_sliding = window is not None
        self.buckets: list[Bucket] = []
        self.seen = 0
        self.prefill_len = 0
        self.batch = self.n_kv_heads = self.head_dim = 0
        self.decode_steps = 0
        self.version = 0  # bumped by every store()

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
        return self.seen + _query_length(query_length), 0

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
        """Negative ``max_length``: drop that many tokens from the end (transformers >= 5.3, whose assisted
        decoding also calls ``crop(0)``, a no-op); positive: keep only positions ``< max_length`` (5.2).
        The method's state follows (``Method.on_crop``); tokens of the prompt may go too (assisted
        decoding's first forward is the prompt plus the draft), then the layer's prompt shrinks."""
        new_seen = self.crop_length(max_length)
        if new_seen >= self.seen:
            return
        if self.buckets and self.cache.keep < 1.0:
            self.cache.method.on_crop(self, new_seen)
        self.seen = new_seen
        self.prefill_len = min(self.prefill_len, new_seen)
        if not self.buckets:
            return
        keys, values, positions, lengths = self.padded()
        self.store(keys, values, positions, (positions >= 0) & (positions < new_seen))

    def crop_length(self, max_length: int) -> int:
        """Tokens seen after ``crop(max_length)`` (see :meth:`crop`)."""
        if max_length == 0:
            return self.seen
        return max(self.seen + max_length, 0) if max_length < 0 else min(max_length, self.seen)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices (B',)`` in that order (beam search's reorder, row selection); the
        method's per-row state follows (``Method.on_batch_select``)."""
        if not self.buckets:
            return
        idx = torch.as_tensor(indices, dtype=torch.long).to(self.device)
        if self.cache.keep < 1.0:
            self.cache.method.on_batch_select(self, idx)
        keys, values, positions, _ = self.padded()
        self.batch = int(idx.shape[0])
        self.store(keys[idx], values[idx], positions[idx], positions[idx] >= 0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats == 1:
            return
        self.batch_select_indices(torch.arange(self.batch).repeat_interleave(repeats))

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
        self.version += 1  # slot layout changed (methods that address storage slots re-map them)
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
        align = PAGE if self.cache.attention_backend == "triton" else 1  # the paged kernel views buckets as pages
        for members in plan_buckets(count_list, **opts):
            seq = torch.tensor(members, dtype=torch.long, device=keys.device)
            max_len = max(count_list[i] for i in members)
            room = headroom if headroom is not None else prefill_headroom(max_len)
            cap = round_up(max_len + room, align)
            if self.window is not None:  # a ring never needs more than W slots in decode
                cap = max(max_len, min(cap, self.window))
            idx = order[seq, :max_len]
            bk = flat_k.new_zeros((len(members), cap, d))
            bv = flat_v.new_zeros((len(members), cap, d))
            bp = flat_p.new_full((len(members), cap), -1, dtype=torch.int32)  # positions < 2**31
            if max_len:
                bk[:, :max_len] = torch.gather(flat_k[seq], 1, idx[..., None].expand(-1, -1, d))
                bv[:, :max_len] = torch.gather(flat_v[seq], 1, idx[..., None].expand(-1, -1, d))
                bp[:, :max_len] = torch.gather(flat_p[seq], 1, idx)
            lens = counts[seq]
            bp[torch.arange(cap, device=keys.device)[None, :] >= lens[:, None]] = -1  # empty slots
            uniform = len({count_list[i] for i in members}) == 1
            bucket = Bucket(seq, bk, bv, bp, lens, max_len, uniform, len(members) == b * h, self.window, align)
            for row, member in enumerate(members):
                self.locate[member] = (len(self.buckets), row)
            self.buckets.append(bucket)
        # the same map as tensors, for vectorised slot writes (write_slots)
        self.locate_bucket = torch.tensor([bucket for bucket, _ in self.locate], device=keys.device)
        self.locate_row = torch.tensor([row for _, row in self.locate], device=keys.device)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append ``q`` new tokens ``(B, Hkv, q, D)`` at positions ``seen..seen+q-1`` to every head."""
        b, h, q, d = key_states.shape
        flat_k = key_states.reshape(b * h, q, d)
        flat_v = value_states.reshape(b * h, q, d)
        for bucket in self.buckets:
            bucket.reserve(q)
            k = flat_k if bucket.is_identity else flat_k[bucket.seq]
            v = flat_v if bucket.is_identity else flat_v[bucket.seq]
            if bucket.window is not None:
                ring_write(bucket, k, v, torch.arange(self.seen, self.seen + q, device=k.device))
            else:
                bucket.append(k, v, self.seen)

    def padded(self):
        """All sequences as padded tensors (the reference view used by methods and tests).

        Returns ``keys, values (B, Hkv, L, D)``, ``positions (B, Hkv, L)`` (-1 on padding) and
        ``lengths (B, Hkv)``; entries are in ascending position order (ring slots are sorted).
        """
        b, h, d = self.batch, self.n_kv_heads, self.head_dim
        length = max((bk.max_len for bk in self.buckets), default=0)
        for bk in self.buckets:
            bk.sync_positions()
        keys = torch.zeros((b * h, length, d), dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        positions = torch.full((b * h, length), -1, dtype=torch.long, device=self.device)
        lengths = torch.zeros(b * h, dtype=torch.long, device=self.device)
        for bk in self.buckets:
            n = bk.max_len
            live = torch.arange(n, device=self.device)[None, :] < bk.lengths[:, None]
            bk_keys, bk_values, bk_pos = bk.keys[:, :n], bk.values[:, :n], bk.positions[:, :n].long()
            if bk.window is not None:  # ring slots: live entries by position, empty slots last
                order = torch.where(live, bk_pos, torch.iinfo(torch.long).max).argsort(dim=-1)
                bk_keys = bk_keys.gather(1, order[..., None].expand(-1, -1, d))
                bk_values = bk_values.gather(1, order[..., None].expand(-1, -1, d))
                bk_pos = bk_pos.gather(1, order)
            keys[bk.seq, :n] = bk_keys * live[..., None]
            values[bk.seq, :n] = bk_values * live[..., None]
            positions[bk.seq, :n] = torch.where(live, bk_pos, -1)
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

    def write_slots(self, seq_ids: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    positions: torch.Tensor) -> None:
        """Overwrite storage slot ``slots[i]`` of sequence ``seq_ids[i]`` (b * Hkv + h) with ``keys[i]``,
        ``values[i] (D,)`` at prompt position ``positions[i]``; lengths are unchanged (methods that
        refill chosen slots in place, e.g. HeteroCache's dynamic slots)."""
        bucket_of, rows = self.locate_bucket[seq_ids], self.locate_row[seq_ids]
        for index, bucket in enumerate(self.buckets):
            mine = bucket_of == index if len(self.buckets) > 1 else slice(None)
            where = (rows[mine], slots[mine])
            bucket.keys[where] = keys[mine].to(bucket.keys.dtype)
            bucket.values[where] = values[mine].to(bucket.values.dtype)
            bucket.positions[where] = positions[mine].to(bucket.positions.dtype)

    def restrict(self, keep: torch.Tensor) -> None:
        """Keep a subset of the stored entries: ``keep (B, Hkv, L)`` over the ``padded()`` layout."""
        keys, values, positions, _ = self.padded()
        self.store(keys, values, positions, keep & (positions >= 0))

    # --- accounting ---------------------------------------------------------------------------
    def kept_prompt_tokens(self) -> torch.Tensor:
        """``(B, Hkv)`` number of stored tokens with position < prefill length."""
        out = torch.zeros(self.batch * self.n_kv_heads, dtype=torch.long, device=self.device)
        for bk in self.buckets:
            bk.sync_positions()
            live = torch.arange(bk.capacity, device=self.device)[None, :] < bk.lengths[:, None]
            out[bk.seq] = (live & (bk.positions < self.prefill_len) & (bk.positions >= 0)).sum(-1)
        return out.view(self.batch, self.n_kv_heads)

    def nbytes(self) -> int:
        return sum(bk.nbytes() for bk in self.buckets)

    def used_bytes(self) -> int:
        """Bytes of the live entries (key, value, position of every stored token)."""
        return sum(int(bk.lengths.sum()) * bk.slot_bytes() for bk in self.buckets)

    def headroom_bytes(self) -> int:
        """Bytes of the slots past each bucket's longest sequence (room for decode tokens)."""
        return sum((bk.capacity - bk.max_len) * len(bk.seq) * bk.slot_bytes() for bk in self.buckets)


class HeadwiseCache(Cache):
    """A ``Cache`` whose layers keep a ragged, per-(batch, KV head) set of tokens.

    Create it with :func:`heterocache.make_cache`. ``stats()`` reports the measured kept fraction
    and bytes per tier.
    """

    def __init__(self, method, keep: float, n_layers: int, n_kv_heads: int, head_dim: int,
                 bucket_options: dict[str, int] | None = None, geometry: dict[str, int] | None = None,
                 attention_backend: str = "sdpa", model_config: Any = None,
                 layer_windows: list[int | None] | None = None):
        self.method, self.keep = method, keep
        # per layer: sliding window W (the layer stores a ring, budgets capped at min(T, W - 1)) or None
        self.layer_windows = list(layer_windows) if layer_windows is not None else [None] * n_layers
        self.model_geometry = geometry or {}
        self.model_config = model_config  # checked once per layer at first update
        self.attention_backend = attention_backend  # "sdpa" or "triton" (resolved by make_cache)
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.bucket_options = bucket_options or {}
        self.prompt_lengths: torch.Tensor | None = None
        self.budget: torch.Tensor | None = None  # (B, n_layers, Hkv) kept prompt tokens, set at prefill
        self.warned_context = False  # _check_context warns once per cache
        self.compress_s = 0.0  # seconds in compress(), summed over layers (timed by hf's prefill, also fanned out)
        super().__init__(layers=[HeadwiseLayer(self, i, self.layer_windows[i]) for i in range(n_layers)])
        method.setup(self)

    # --- the step protocol --------------------------------------------------------------------
    def compress(self, layer: HeadwiseLayer, module, query: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        """End of ``layer``'s prefill: the method selects, the layer stores only the kept tokens.

        ``query (B, Hq, T, D)``, ``keys/values (B, Hkv, T, D)``, ``valid (B, T)`` (False on padding).
        On a sliding-window layer the method sees ``valid`` False also on the prompt tokens no later
        query can attend to (all but the last ``W - 1`` slots), so it never scores or keeps them.
        """
        b, h, length, _ = keys.shape
        if self.budget is None:
            self._check_context(length)
            self.prompt_lengths = valid.sum(-1)
            self.budget = self._budget_table(self.prompt_lengths).to(keys.device)
        layer.prefill_len = length
        if layer.window is not None:
            valid = valid & (torch.arange(length, device=valid.device) > length - layer.window)[None, :]
        ctx = PrefillContext(
            layer_idx=layer.layer_idx, n_layers=self.n_layers, queries=query, keys=keys, values=values,
            valid=valid, prompt_lengths=self.prompt_lengths, scaling=scaling, keep=self.keep,
            budget=self.budget[:, layer.layer_idx], layers=self.layers, module=module,
            window=layer.window, layer_windows=self.layer_windows,
        )
        keep = self.method.select(ctx)
        if keep.shape != (b, h, length) or keep.dtype != torch.bool:
            raise RuntimeError(
                f"method {self.method.name!r} returned a mask of shape {tuple(keep.shape)} / {keep.dtype}; "
                f"expected bool {(b, h, length)}"
            )
        positions = torch.arange(length, device=keys.device).expand(b, h, length)
        layer.store(keys, values, positions, keep & valid[:, None, :])
        self.method.after_store(layer)

    def decode(self, layer: HeadwiseLayer, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """One decode attention of ``layer`` (its new tokens already appended): ``query (B, Hq, q, D)``
        -> ``(B, q, Hq, D)``. The method's hooks run before and after, except at ``keep=1.0``.
        Sliding-window layers attend through their rings' position masks (``layer.window``)."""
        hooks = self.keep < 1.0  # keep=1.0 is FullKV, during decode too
        if layer.layer_idx == 0:
            self._check_context(layer.seen)
        if hooks:
            self.method.before_decode_attention(layer, query)
        first_query = layer.seen - query.shape[2]
        out = decode_attention(query, layer.buckets, layer.n_kv_heads, scaling, self.attention_backend, first_query,
                               exact=not hooks)
        layer.decode_steps += 1
        if hooks:
            self.method.on_decode_step(DecodeContext(
                layer_idx=layer.layer_idx, n_layers=self.n_layers, queries=query, layer=layer,
                step=layer.decode_steps, scaling=scaling, keep=self.keep,
                budget=self.budget[:, layer.layer_idx], window=layer.window,
            ))
        return out

    def _check_context(self, length: int) -> None:
        """Warn once per cache when the sequence outgrows the model's context window (``max_position_embeddings``):
        a warning, not an error, because users who extend RoPE on purpose go there."""
        limit = self.model_geometry.get("max_positions", 0)
        if limit and length > limit and not self.warned_context:
            self.warned_context = True
            warnings.warn(f"the sequence has {length} tokens, more than the model's context window of {limit} "
                          "(config.max_position_embeddings); quality beyond it is not what the model was trained "
                          "for unless its RoPE scaling extends it", UserWarning, stacklevel=2)

    def _budget_table(self, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """``(B, n_layers, Hkv)`` budgets from the method, sliding layers capped at ``min(T, W - 1)`` with
        the excess moved to full-attention heads (:func:`heterocache.budget.cap_sliding`). A short prompt
        at a small ``keep`` leaves some heads without any prompt token (the total is what it is, e.g. 9
        tokens for 90 heads): they attend over their decode tokens only."""
        windows = self.layer_windows
        return budget_table(lambda n: cap_sliding(self.method.budgets(self.keep, n, self.n_layers, self.n_kv_heads),
                                                  windows, n), prompt_lengths.cpu())

    def _stats_by_layer_type(self) -> dict[str, Any]:
        """Kept fraction and device bytes of full-attention and sliding-window layers (None: no such layer).

        Full layers: kept prompt entries / ``sum_b T_b * n_full_layers * Hkv``. Sliding layers: kept
        prompt entries / the prompt entries they can still use, ``sum_b min(T_b, W - 1) * Hkv`` per
        layer (1.0 = everything a ``DynamicCache`` keeps there); ring overwrites during decode lower it.
        """
        lengths = self.prompt_lengths.tolist() if self.prompt_lengths is not None else []
        out: dict[str, Any] = {}
        for kind, sliding in (("full", False), ("sliding", True)):
            members = [layer for layer in self.layers if layer.is_sliding == sliding]
            reachable = sum(sliding_cap(n, layer.window) for layer in members for n in lengths) * self.n_kv_heads
            kept = sum(int(layer.kept_prompt_tokens().sum()) for layer in members if layer.buckets)
            out[f"keep_fraction_{kind}_layers"] = (kept / reachable if reachable else 1.0) if members else None
            out[f"device_bytes_{kind}_layers"] = sum(layer.nbytes() for layer in members)
        return out

    # --- generate's edits: beam reorders, row selection, draft rejection --------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: batch row ``i`` continues beam ``beam_idx[i]`` (:meth:`batch_select_indices`)."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices (B',)`` in that order: every layer's storage, the budget table, the
        prompt lengths and the method's per-row state (slots, slow-tier rows, drift anchors) follow."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.budget is not None:
            self.budget = self.budget[idx.to(self.budget.device)]
            self.prompt_lengths = self.prompt_lengths[idx.to(self.prompt_lengths.device)]
        for layer in self.layers:
            layer.batch_select_indices(idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times in place (row ``b`` becomes rows ``b * repeats ...``)."""
        batch = self.prompt_lengths.shape[0] if self.prompt_lengths is not None else self.layers[0].batch
        if repeats != 1 and batch:
            self.batch_select_indices(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        """Drop the newest tokens (assisted decoding rejects draft tokens: ``crop(-n)``; ``crop(0)`` is a
        no-op; a positive value keeps positions ``< max_length``, as transformers 5.2 calls it). When
        tokens of the prompt go (assisted decoding verifies its first draft together with the prompt),
        the prompt lengths the accounting uses shrink with it."""
        first = self.layers[0]
        new_length = first.crop_length(max_length)
        cut = first.prefill_len - new_length
        if self.prompt_lengths is not None and cut > 0:
            self.prompt_lengths = (self.prompt_lengths - cut).clamp(min=0)
        for layer in self.layers:
            layer.crop(max_length)

    # --- lifecycle ----------------------------------------------------------------------------
    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.method.close()
        self.prompt_lengths = None
        self.budget = None
        self.compress_s = 0.0
        self.method.setup(self)

    def close(self) -> None:
        """Stop background work and delete slow-tier copies (files of the disk tier)."""
        self.method.close()

    def stats(self) -> dict[str, Any]:
        """Measured statistics from the tensors actually held, merged with the method's own.

        Bytes of the layers' storage: ``device_used_bytes`` (live entries: key, value, int32 position) +
        ``device_overhead_bytes``, which splits into ``device_headroom_bytes`` (slots reserved for decode
        tokens past each bucket's longest sequence) and ``device_padding_bytes`` (shorter sequences of a
        bucket padded to its longest). ``device_bytes`` = layers' storage + the method's own device
        bytes (e.g. a device-resident tier). ``compress_s``: seconds this cache's prefill spent in
        :meth:`compress` (selection + store, every layer), also when its prefill was shared
        (heterocache/fanout.py)."""
        layers = [layer for layer in self.layers if layer.buckets]
        prompt = int(self.prompt_lengths.sum()) if self.prompt_lengths is not None else 0
        kept = sum(int(layer.kept_prompt_tokens().sum()) for layer in layers)
        denom = prompt * self.n_layers * self.n_kv_heads
        device = sum(layer.nbytes() for layer in layers)
        used = sum(layer.used_bytes() for layer in layers)
        headroom = sum(layer.headroom_bytes() for layer in layers)
        out: dict[str, Any] = {
            "method": self.method.name,
            "keep": self.keep,
            "keep_fraction": kept / denom if denom else 1.0,
            "prompt_tokens": prompt,
            "kept_tokens": kept,
            "seen_tokens": self.get_seq_length(),
            "device_bytes": device,
            "device_used_bytes": used,
            "device_overhead_bytes": device - used,
            "device_headroom_bytes": headroom,
            "device_padding_bytes": device - used - headroom,
            "host_bytes": 0,
            "disk_bytes": 0,
            "buckets_per_layer": max((len(layer.buckets) for layer in layers), default=0),
            "compress_s": self.compress_s,
            **self._stats_by_layer_type(),
        }
        for name, value in self.method.stats().items():
            out[name] = out[name] + value if name in ("device_bytes", "host_bytes", "disk_bytes") else value
        return out
