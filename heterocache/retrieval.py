"""HeteroCache runtime: budgets per row, the slow tier, drift checks and asynchronous refreshes.

Timeline of one layer: prefill stores anchors/satellites compressed, copies the satellites' full
K/V into the tier and records each pivot's reference set ``R_p``. Every decode step the pivot
queries are buffered; every ``steps`` steps (after the attention of that step) each pivot scores the
buffered queries against its prompt keys, takes top-k sets and compares them with ``R_p``; when the
median overlap falls under the threshold, its satellites get new token sets chosen by the pivot's
newest scores, fetched from the tier (worker thread / CUDA copy stream) and swapped in before the
attention of the next step. Everything is per batch row.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from heterocache.methods.scoring import select_with_forced, topk_mask
from heterocache.tiers import make_tier

COUNTERS = ("retrieval_checks", "retrieval_triggers", "retrieval_tokens", "retrieval_bytes",
            "retrieval_exposed_s", "retrieval_overlapped_s")


class Runtime:
    def __init__(self, method, cache):
        from heterocache.methods.heterocache import allocate

        self.method, self.cache, self.allocate = method, cache, allocate
        self.profile = method.profile
        self.layers: dict[int, dict] = {}
        self.pending: dict[int, tuple] = {}
        self.plan = None
        self.tier = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="heterocache-fetch") \
            if method.retrieval == "async" else None
        self.copy_stream = None
        for name in COUNTERS:
            cache.counters.setdefault(name, 0)

    # --- prefill -------------------------------------------------------------------------------
    def layer_plan(self, ctx):
        """``(budget (B, H) long, full (B, H) bool)`` of ``ctx.layer_idx`` (computed once per prefill)."""
        key = tuple(ctx.prompt_lengths.tolist())
        if self.plan is None or self.plan[0] != key:
            budgets, fulls = {}, {}
            for length in set(key):
                budgets[length], fulls[length] = self.allocate(
                    self.profile, ctx.keep, length, self.method.weighting, self.method.sinks + 1,
                    self.method.max_full_share)
            budget = torch.tensor([budgets[n] for n in key], dtype=torch.long, device=ctx.keys.device)
            full = torch.tensor([fulls[n] for n in key], dtype=torch.bool, device=ctx.keys.device)
            self.plan = (key, budget, full)
            self.layers.clear()
        _, budget, full = self.plan
        return budget[:, ctx.layer_idx], full[:, ctx.layer_idx]

    def after_prefill_select(self, ctx, full, budget) -> None:
        """Record pivot references and copy satellites to the slow tier for ``ctx.layer_idx``."""
        if self.method.retrieval == "off":
            return
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
            self.tier = make_tier(self.method.offload, ctx.keys.device, self.method.offload_dir)
            self.cache.tiers[self.tier.name] = self.tier
        b, _, length, d = ctx.keys.shape
        self.tier.put(layer, ctx.keys[:, satellites].reshape(-1, length, d),
                      ctx.values[:, satellites].reshape(-1, length, d))
        scores = self.method.last_query_scores(ctx)[:, pivots]
        k = torch.minimum(self.method.drift_k(budget[:, satellites]), ctx.valid.sum(-1))
        stability = torch.tensor([self.profile.heads[layer][p].stability for p in pivots], device=ctx.keys.device)
        self.layers[layer] = {
            "pivots": pivots, "satellites": satellites, "owner": torch.tensor(owner, device=ctx.keys.device),
            "reference": topk_mask(scores, k[:, None].expand(-1, len(pivots)), ctx.valid), "k": k,
            "valid": ctx.valid,
            "budget": budget[:, satellites], "buffer": [], "length": length, "stability": stability,
        }

    # --- decode --------------------------------------------------------------------------------
    def observe(self, ctx) -> None:
        info = self.layers.get(ctx.layer_idx)
        if info is None:
            return
        b, hq, q, d = ctx.queries.shape
        h = self.cache.n_kv_heads
        grouped = ctx.queries.view(b, h, hq // h, q, d)[:, info["pivots"]]
        info["buffer"].append(grouped)
        if ctx.step % self.method.steps:
            return
        queries = torch.cat(info["buffer"], dim=3)
        info["buffer"] = []
        self.check(ctx, info, queries)

    def pivot_keys(self, layer, info) -> torch.Tensor:
        """Prompt keys of the pivots, right-aligned to the padded prompt: ``(B, P, T, D)``."""
        b, h, length = layer.batch, layer.n_kv_heads, info["length"]
        seqs = [row * h + p for row in range(b) for p in info["pivots"]]
        prefix = layer.prefix(seqs, length).view(b, len(info["pivots"]), length, -1)
        pad = length - info["valid"].sum(-1)  # (B,)
        index = (torch.arange(length, device=prefix.device)[None, :] - pad[:, None]).clamp(min=0)
        gathered = torch.gather(prefix, 2, index[:, None, :, None].expand_as(prefix))
        return gathered * info["valid"][:, None, :, None]

    def check(self, ctx, info, queries) -> None:
        from heterocache.methods.heterocache import pivot_scores

        method, counters = self.method, self.cache.counters
        valid = info["valid"]
        scores = pivot_scores(queries, self.pivot_keys(ctx.layer, info), valid, ctx.scaling, 5)  # (B, P, s, T)
        b, p, s, length = scores.shape
        k = info["k"]  # (B,)
        current = topk_mask(scores.reshape(b, p * s, length), k[:, None].expand(b, p * s), valid).view(b, p, s, length)
        overlap = (current & info["reference"][:, :, None]).sum(-1).float() / k[:, None, None].float()
        median = overlap.median(dim=-1).values  # (B, P)
        if method.drift_threshold == "auto":
            threshold = info["stability"][None, :]
        else:
            threshold = torch.tensor(float(method.drift_threshold), device=median.device)
        triggered = median < threshold
        counters["retrieval_checks"] += b * p
        n_triggered = int(triggered.sum())
        if not n_triggered:
            return
        counters["retrieval_triggers"] += n_triggered
        info["reference"] = torch.where(triggered[..., None], current[:, :, -1], info["reference"])
        self.schedule(ctx.layer_idx, info, scores[:, :, -1], triggered)

    def schedule(self, layer_idx, info, newest, triggered) -> None:
        """Choose the refreshed satellite sets and start fetching them from the tier."""
        owner = info["owner"]
        sat_scores = newest[:, owner]  # (B, S, T) the pivot chooses positions
        chosen = select_with_forced(sat_scores, info["valid"], info["budget"], self.method.sinks,
                                    self.method.recent(info["budget"]))
        refresh = triggered[:, owner]  # (B, S)
        rows_b, rows_s = torch.nonzero(refresh, as_tuple=True)
        counts = info["budget"][rows_b, rows_s]
        width = int(counts.max())
        order = torch.sort((~chosen[rows_b, rows_s]).to(torch.int8), dim=-1, stable=True).indices[:, :width]
        n_sat = len(info["satellites"])
        tier_rows = rows_b * n_sat + rows_s
        h = self.cache.n_kv_heads
        seq_ids = (rows_b * h + torch.tensor(info["satellites"], device=rows_s.device)[rows_s]).tolist()
        device = newest.device
        tier, stream = self.tier, self._stream(device)

        def fetch():
            start = time.perf_counter()
            keys, values = tier.gather(layer_idx, tier_rows, order)
            event = staged = None
            if device.type == "cuda":
                keys, values = keys.pin_memory(), values.pin_memory()  # one staging pair per transfer
                staged = (keys, values)
                with torch.cuda.stream(stream):
                    keys, values = keys.to(device, non_blocking=True), values.to(device, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
            else:
                keys, values = keys.to(device), values.to(device)
            return keys, values, event, staged, time.perf_counter() - start

        job = self.executor.submit(fetch) if self.executor else fetch()
        self.pending[layer_idx] = (job, seq_ids, order, counts.tolist())

    def _stream(self, device):
        if device.type == "cuda" and self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(device)
        return self.copy_stream

    def apply_pending(self, layer) -> None:
        job = self.pending.pop(layer.layer_idx, None)
        if job is None:
            return
        handle, seq_ids, order, counts = job
        counters = self.cache.counters
        start = time.perf_counter()
        result = handle.result() if self.executor else handle
        waited = time.perf_counter() - start
        keys, values, event, _staged, fetch_seconds = result
        if event is not None:
            torch.cuda.current_stream(keys.device).wait_event(event)
        layer.overwrite_prefix(seq_ids, keys, values, order.to(keys.device), counts)
        moved = sum(counts)
        counters["retrieval_tokens"] += moved
        counters["retrieval_bytes"] += 2 * moved * keys.shape[-1] * keys.element_size()
        if self.executor:
            counters["retrieval_exposed_s"] += waited
            counters["retrieval_overlapped_s"] += max(0.0, fetch_seconds - waited)
        else:
            counters["retrieval_exposed_s"] += fetch_seconds

    def close(self) -> None:
        self.pending.clear()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
