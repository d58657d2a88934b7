"""HeteroCache runtime: the slow tier, drift checks and asynchronous refreshes, per batch row.

Timeline of one layer: prefill stores anchors/satellites compressed; :meth:`Runtime.watch` copies
the satellites' full K/V into the tier and records each pivot's reference set ``R_p``. Every decode
step the pivot queries are buffered (:meth:`Runtime.observe`); every ``steps`` steps, after the
attention of that step, each pivot scores the buffered queries against its prompt keys, takes
top-k sets and compares them with ``R_p``; when the median overlap falls under the threshold, its
satellites get new token sets chosen by the pivot's newest scores, fetched from the tier (worker
thread; on CUDA a copy stream) and swapped in by :meth:`Runtime.apply_pending` before the
attention of the next step (spec pitfall 13).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from heterocache.methods.scoring import pooled_row_attention, select_with_forced, topk_mask
from heterocache.retrieval.tiers import Tier, make_tier


@dataclass(frozen=True)
class Settings:
    """The method options the runtime needs (see ``HeteroCache`` for their meaning)."""

    steps: int
    topk: int | None
    drift_threshold: float | str
    retrieval: str
    offload: str
    offload_dir: Any
    sinks: int
    window: int
    recent_fraction: float


def recent_tokens(budget: torch.Tensor, window: int, recent_fraction: float) -> torch.Tensor:
    """Most recent prompt tokens each compressed head always keeps: ``(B, H)`` long."""
    return torch.clamp((budget * recent_fraction).long(), min=window)


def last_query_scores(ctx) -> torch.Tensor:
    """Pooled attention of the last prompt token per KV head ``(B, H, T)`` (the drift reference)."""
    b, hq, _, d = ctx.queries.shape
    last = ctx.queries[:, :, -1:].reshape(b, ctx.n_kv_heads, hq // ctx.n_kv_heads, 1, d)
    return pooled_row_attention(last, ctx.keys, ctx.scaling, ctx.valid[:, None, None, None, :])[:, :, 0]


@dataclass
class Counters:
    """Retrieval counters, reported by ``cache.stats()`` as ``retrieval_<name>``."""

    checks: int = 0  # (row, pivot) drift checks
    triggers: int = 0  # checks whose overlap fell under the threshold
    tokens: int = 0  # tokens fetched from the tier
    bytes: int = 0  # bytes of keys + values fetched
    critical_bytes: int = 0  # of which a decode step waited for (retrieval="sync": fetched inside the step)
    prefetched_bytes: int = 0  # of which fetched behind decode work (retrieval="async": applied a step later)
    exposed_s: float = 0.0  # time the decode step waited for a fetch
    overlapped_s: float = 0.0  # fetch time hidden behind decode work

    def as_stats(self) -> dict[str, float]:
        return {f"retrieval_{f.name}": getattr(self, f.name) for f in fields(self)}


@dataclass
class LayerWatch:
    """The monitored stars of one layer (only pivots that stay full and have compressed satellites)."""

    pivots: list[int]  # KV heads
    satellites: list[int]  # KV heads, tier rows are (batch row, satellite) in this order
    owner: torch.Tensor  # (S,) index into ``pivots`` of each satellite's pivot
    reference: torch.Tensor  # (B, P, T) bool: each pivot's top-k set at its last refresh
    k: torch.Tensor  # (B,) size of the compared top-k sets
    valid: torch.Tensor  # (B, T) prompt slots that are not padding
    budget: torch.Tensor  # (B, S) satellite budgets
    stability: torch.Tensor  # (P,) calibrated stability of each pivot (drift_threshold="auto")
    buffer: list[torch.Tensor] = field(default_factory=list)  # pivot queries since the last check

    @property
    def length(self) -> int:
        return self.valid.shape[-1]


@dataclass
class Fetched:
    keys: torch.Tensor  # (m, width, D) on the model's device
    values: torch.Tensor
    event: Any  # CUDA event recorded after the copy, or None
    seconds: float  # time the fetch took


@dataclass
class PendingRefresh:
    job: Future | Fetched  # a Future on the worker thread, or the finished fetch (sync)
    seq_ids: list[int]  # cache sequence ids (b * Hkv + h) to overwrite
    positions: torch.Tensor  # (m, width) prompt positions fetched, ascending
    counts: list[int]  # tokens per refreshed sequence (its budget)


class Runtime:
    def __init__(self, settings: Settings, profile):
        self.settings = settings
        self.profile = profile
        self.layers: dict[int, LayerWatch] = {}
        self.pending: dict[int, PendingRefresh] = {}
        self.tier: Tier | None = None
        self.counters = Counters()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="heterocache-fetch") \
            if settings.retrieval == "async" else None
        self.copy_stream = None

    # --- prefill -------------------------------------------------------------------------------
    def watch(self, ctx, full: torch.Tensor) -> None:
        """Record pivot references and copy satellites to the slow tier for ``ctx.layer_idx``.

        ``full (B, H)``: heads kept whole in this prefill (after demotion).
        """
        layer = ctx.layer_idx
        monitors = full.all(dim=0).tolist()
        pivots, satellites, owner = [], [], []
        for pivot, members in self.profile.stars(layer).items():
            members = [s for s in members if not bool(full[:, s].any())]
            if monitors[pivot] and members:
                pivots.append(pivot)
                for s in members:
                    satellites.append(s)
                    owner.append(len(pivots) - 1)
        if not pivots:
            return
        if self.tier is None:
            self.tier = make_tier(self.settings.offload, ctx.keys.device, self.settings.offload_dir)
        _, _, length, d = ctx.keys.shape
        self.tier.put(layer, ctx.keys[:, satellites].reshape(-1, length, d),
                      ctx.values[:, satellites].reshape(-1, length, d))
        scores = last_query_scores(ctx)[:, pivots]
        budget = ctx.budget[:, satellites]
        k = torch.minimum(self.drift_k(budget), ctx.valid.sum(-1))
        device = ctx.keys.device
        self.layers[layer] = LayerWatch(
            pivots=pivots, satellites=satellites, owner=torch.tensor(owner, device=device),
            reference=topk_mask(scores, k[:, None].expand(-1, len(pivots)), ctx.valid), k=k, valid=ctx.valid,
            budget=budget,
            stability=torch.tensor([self.profile.heads[layer][p].stability for p in pivots], device=device),
        )

    def drift_k(self, satellite_budget: torch.Tensor) -> torch.Tensor:
        """``(B,)`` size of the compared top-k sets given the satellites' budgets ``(B, S)``."""
        if self.settings.topk is None:
            return satellite_budget.max(dim=-1).values.clamp(min=1, max=1024)
        return torch.full_like(satellite_budget[:, 0], int(self.settings.topk))

    # --- decode --------------------------------------------------------------------------------
    def observe(self, ctx) -> None:
        """Buffer the pivots' new queries; every ``steps`` decode steps run the drift check."""
        watch = self.layers.get(ctx.layer_idx)
        if watch is None:
            return
        b, hq, q, d = ctx.queries.shape
        h = ctx.layer.n_kv_heads
        watch.buffer.append(ctx.queries.view(b, h, hq // h, q, d)[:, watch.pivots])
        if ctx.step % self.settings.steps:
            return
        queries = torch.cat(watch.buffer, dim=3)
        watch.buffer = []
        self.check(ctx, watch, queries)

    def pivot_keys(self, layer, watch: LayerWatch) -> torch.Tensor:
        """Prompt keys of the pivots, right-aligned to the padded prompt: ``(B, P, T, D)``."""
        b, h, length = layer.batch, layer.n_kv_heads, watch.length
        seqs = [row * h + p for row in range(b) for p in watch.pivots]
        prefix = layer.prefix(seqs, length).view(b, len(watch.pivots), length, -1)
        pad = length - watch.valid.sum(-1)  # (B,)
        index = (torch.arange(length, device=prefix.device)[None, :] - pad[:, None]).clamp(min=0)
        gathered = torch.gather(prefix, 2, index[:, None, :, None].expand_as(prefix))
        return gathered * watch.valid[:, None, :, None]

    def check(self, ctx, watch: LayerWatch, queries: torch.Tensor) -> None:
        """Drift check of every pivot of the layer over the buffered ``queries (B, P, G, s, D)``."""
        valid = watch.valid
        scores = pooled_row_attention(queries, self.pivot_keys(ctx.layer, watch), ctx.scaling,
                                      valid[:, None, None, None, :])  # (B, P, s, T)
        b, p, s, length = scores.shape
        k = watch.k
        current = topk_mask(scores.reshape(b, p * s, length), k[:, None].expand(b, p * s), valid).view(b, p, s, length)
        overlap = (current & watch.reference[:, :, None]).sum(-1).float() / k[:, None, None].float()
        median = overlap.median(dim=-1).values  # (B, P)
        if self.settings.drift_threshold == "auto":
            threshold = watch.stability[None, :]
        else:
            threshold = torch.tensor(float(self.settings.drift_threshold), device=median.device)
        triggered = median < threshold
        self.counters.checks += b * p
        n_triggered = int(triggered.sum())
        if not n_triggered:
            return
        self.counters.triggers += n_triggered
        watch.reference = torch.where(triggered[..., None], current[:, :, -1], watch.reference)
        self.schedule(ctx.layer_idx, ctx.layer.n_kv_heads, watch, scores[:, :, -1], triggered)

    def schedule(self, layer_idx: int, n_kv_heads: int, watch: LayerWatch, newest: torch.Tensor,
                 triggered: torch.Tensor) -> None:
        """Choose the refreshed satellite sets (by their pivot's ``newest (B, P, T)`` scores) and start
        fetching them from the tier."""
        sat_scores = newest[:, watch.owner]  # (B, S, T) the pivot chooses positions
        settings = self.settings
        chosen = select_with_forced(sat_scores, watch.valid, watch.budget, settings.sinks,
                                    recent_tokens(watch.budget, settings.window, settings.recent_fraction))
        refresh = triggered[:, watch.owner]  # (B, S)
        rows_b, rows_s = torch.nonzero(refresh, as_tuple=True)
        counts = watch.budget[rows_b, rows_s]
        width = int(counts.max())
        positions = torch.sort((~chosen[rows_b, rows_s]).to(torch.int8), dim=-1, stable=True).indices[:, :width]
        tier_rows = rows_b * len(watch.satellites) + rows_s
        seq_ids = (rows_b * n_kv_heads + torch.tensor(watch.satellites, device=rows_s.device)[rows_s]).tolist()
        device = newest.device
        tier, stream = self.tier, self._stream(device)

        def fetch() -> Fetched:
            start = time.perf_counter()
            keys, values = tier.gather(layer_idx, tier_rows, positions)  # pinned when bound for CUDA
            event = None
            if keys.device != device:
                if device.type == "cuda":
                    with torch.cuda.stream(stream):
                        keys, values = keys.to(device, non_blocking=True), values.to(device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    keys, values = keys.to(device), values.to(device)
            return Fetched(keys, values, event, time.perf_counter() - start)

        job = self.executor.submit(fetch) if self.executor else fetch()
        self.pending[layer_idx] = PendingRefresh(job, seq_ids, positions, counts.tolist())

    def _stream(self, device: torch.device):
        if device.type == "cuda" and self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(device)
        return self.copy_stream

    def apply_pending(self, layer) -> None:
        """Swap a finished refresh of ``layer`` into the cache (before this step's attention)."""
        refresh = self.pending.pop(layer.layer_idx, None)
        if refresh is None:
            return
        start = time.perf_counter()
        fetched = refresh.job.result() if isinstance(refresh.job, Future) else refresh.job
        waited = time.perf_counter() - start
        if fetched.event is not None:
            torch.cuda.current_stream(fetched.keys.device).wait_event(fetched.event)
        layer.overwrite_prefix(refresh.seq_ids, fetched.keys, fetched.values,
                               refresh.positions.to(fetched.keys.device), refresh.counts)
        moved = sum(refresh.counts)
        self.counters.tokens += moved
        nbytes = 2 * moved * fetched.keys.shape[-1] * fetched.keys.element_size()
        self.counters.bytes += nbytes
        if self.executor:
            self.counters.prefetched_bytes += nbytes
        else:
            self.counters.critical_bytes += nbytes
        if self.executor:
            self.counters.exposed_s += waited
            self.counters.overlapped_s += max(0.0, fetched.seconds - waited)
        else:
            self.counters.exposed_s += fetched.seconds

    # --- generate's edits: beam reorders, draft rejection ---------------------------------------
    def select_rows(self, layer, indices: torch.Tensor) -> None:
        """Before ``layer`` keeps batch rows ``indices (B',)`` (beam search): a pending refresh is applied
        first (it addresses the old rows); references, budgets, buffered queries and tier rows follow."""
        self.apply_pending(layer)
        watch = self.layers.get(layer.layer_idx)
        if watch is None:
            return
        rows = indices.to(watch.k.device)
        for name in ("reference", "k", "valid", "budget"):
            setattr(watch, name, getattr(watch, name).index_select(0, rows))
        watch.buffer = [queries.index_select(0, rows) for queries in watch.buffer]
        n_sat = len(watch.satellites)
        tier_rows = (rows[:, None] * n_sat + torch.arange(n_sat, device=rows.device)).reshape(-1)
        self.tier.select_rows(layer.layer_idx, tier_rows)

    def crop(self, layer, length: int) -> None:
        """Decode tokens may be dropped; prompt tokens may not: the satellites' tier copies and the
        pivots' references are the whole prompt, which a refresh would bring back."""
        watch = self.layers.get(layer.layer_idx)
        if watch is not None and length < watch.length:
            raise ValueError(
                f"heterocache with retrieval={self.settings.retrieval!r} cannot drop prompt tokens (crop to "
                f"{length} of a {watch.length}-token prompt), which assisted decoding (assistant_model= or "
                "prompt_lookup_num_tokens=) does when it rejects its first draft: use retrieval='dynamic' (the "
                "default) or retrieval='off', or generate without assisted decoding"
            )

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = self.counters.as_stats()
        if self.tier is not None:
            out[f"{self.tier.name}_bytes"] = self.tier.nbytes()
        return out

    def close(self) -> None:
        self.pending.clear()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        if self.tier is not None:
            self.tier.close()
