"""HeteroCache (ACL 2026): heterogeneous per-head budgets + drift-triggered retrieval.

Roles come from a :class:`~heterocache.profiling.profile.HeadProfile`: volatile and pivot heads
keep every token; anchors keep a fixed set chosen at prefill; satellites keep a set on the device
and their full prefill K/V in a slower tier, refreshed from it when their pivot's attention drifts
(runtime in ``heterocache/retrieval.py``). Budgets follow docs/DESIGN.md s.2: full heads take ``T``
each and anchors + satellites share the rest in proportion to their profile weights (less stable
heads get more), water-filled so the total is exactly ``round(keep * T * n_layers * n_kv_heads)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from heterocache.budget import total_budget, weighted_budgets
from heterocache.methods.base import DecodeContext, Method, PrefillContext, register
from heterocache.methods.scoring import pool1d, reduce_gqa, select_with_forced, window_attention
from heterocache.methods.snapkv import window_votes

EPS = 1e-6


def allocate(profile, keep: float, prompt_len: int, weighting: str = "profile", min_tokens: int = 5,
             max_full_share: float = 1.0):
    """Per-head budgets and full-head flags for one prompt length.

    Returns ``(budgets [L][H] int, full [L][H] bool)``. When ``keep`` cannot pay for every full
    head plus ``min_tokens`` per compressed head, full heads are demoted to compressed ones, the
    most stable first (volatile heads before pivots): the fewest demotions that fit. A demoted
    pivot stops monitoring; its satellites then stay static. Demotion continues while full heads
    would take more than ``max_full_share`` of the total (so compressed heads are never starved).
    Raises ``ValueError`` only when even ``min_tokens`` per head does not fit.
    """
    layers, heads = profile.n_layers, profile.n_kv_heads
    n = layers * heads
    total = total_budget(keep, prompt_len, layers, heads)
    floor_tokens = min(min_tokens, prompt_len)
    if total < n * floor_tokens:
        raise ValueError(
            f"keep={keep} leaves {total} tokens for {n} heads; heterocache needs at least {floor_tokens} per head "
            f"(keep >= {n * floor_tokens / (prompt_len * n):.4f} for a {prompt_len}-token prompt)"
        )
    records = [h for row in profile.heads for h in row]
    full = {(h.layer, h.head) for h in records if h.is_full}
    demote_order = sorted((h for h in records if h.is_full),
                          key=lambda h: (h.role == "pivot", -h.stability, h.layer, h.head))
    for h in demote_order:
        fits = len(full) * prompt_len + (n - len(full)) * floor_tokens <= total
        if fits and len(full) * prompt_len <= max_full_share * total:
            break
        full.discard((h.layer, h.head))
    compressed = [h for h in records if (h.layer, h.head) not in full]
    if weighting == "uniform":
        weights = [1.0] * len(compressed)
    elif weighting == "profile":
        # profile weights are M * (1/(S+eps)) / sum(...); demoted full heads have none: give them the
        # same formula on the same scale (the normalising constant of the profile's own weights)
        scales = [h.weight * (h.stability + EPS) for h in records if h.weight is not None]
        scale = sum(scales) / len(scales) if scales else 1.0
        weights = [h.weight if h.weight is not None else scale / (h.stability + EPS) for h in compressed]
    else:
        raise ValueError(f"weighting={weighting!r} is invalid; choose 'profile' or 'uniform'")
    shares = weighted_budgets(total - len(full) * prompt_len, weights, [prompt_len] * len(compressed),
                              floor_tokens) if compressed else []
    budgets = [[prompt_len] * heads for _ in range(layers)]
    is_full = [[(layer, head) in full for head in range(heads)] for layer in range(layers)]
    for h, share in zip(compressed, shares):
        budgets[h.layer][h.head] = share
    return budgets, is_full


def pivot_scores(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float,
                 kernel: int) -> torch.Tensor:
    """Pooled attention of pivot queries: ``queries (B, P, G, s, D)``, ``keys (B, P, T, D)``,
    ``valid (B, T)`` -> ``(B, P, s, T)`` (softmax per query head, mean over the group, avg-pooled)."""
    logits = torch.einsum("bpgsd,bptd->bpgst", queries.float(), keys.float()) * scaling
    logits = logits.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=2)
    return pool1d(probs, kernel, "avg")


@register
@dataclass
class HeteroCache(Method):
    """HeteroCache: anchor / volatile / pivot / satellite heads with per-head budgets.

    Parameters
    ----------
    profile : HeadProfile | str | None
        The head profile (object or JSON path). ``None``: the cached profile of the embedded model.
    steps : int
        Drift-check period in decode tokens (paper: 5).
    topk : int | None
        Size of the pivot's attention set compared between checks. ``None``: the largest budget
        among the pivot's satellites (at most 1024), i.e. the set that a refresh would fetch; the
        paper's 1024 exceeds most budgets at short contexts and then never sees drift.
    drift_threshold : float | str
        Overlap below which satellites are refreshed (paper: 0.5). ``"auto"``: per pivot, its own
        calibrated stability ``S_p`` (the overlap it typically keeps), so only unusual drift fires.
    retrieval : str
        ``"async"`` (worker thread / CUDA copy stream), ``"sync"`` or ``"off"`` (static cache).
    offload : str
        Slow tier of the satellites' full copies: ``"host"``, ``"disk"`` or ``"none"`` (device).
    offload_dir : str | None
        Directory for the disk tier (default: a temporary directory removed on reset).
    weighting : str
        ``"profile"`` (stability weights) or ``"uniform"`` (ablation).
    max_full_share : float
        Largest share of the total budget that full heads (volatile, pivot) may take; beyond it
        the most stable full heads are demoted to compressed ones (1.0 = the paper's rule, which
        starves compressed heads when ``keep`` is near the full-head fraction).
    window, kernel, pooling : int, int, str
        Prefill scoring of compressed heads (SnapKV-style window votes; the reference code uses a
        window of 1, pitfall 19).
    sinks : int
        First tokens always kept by compressed heads (pitfall 20); the ``window`` most recent too.
    recent_fraction : float
        Share of each compressed head's budget reserved for the most recent prompt tokens (at
        least ``window``); the rest goes to the highest-scoring tokens.
    """

    name = "heterocache"
    description = "HeteroCache: per-head roles and budgets from a profile, drift-triggered retrieval"

    profile: Any = None
    steps: int = 5
    topk: Any = None
    drift_threshold: Any = 0.5
    retrieval: str = "async"
    offload: str = "host"
    offload_dir: Any = None
    weighting: str = "profile"
    max_full_share: float = 0.5
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    sinks: int = 4
    recent_fraction: float = 0.0

    @property
    def needs_decode_hook(self) -> bool:  # type: ignore[override]
        return self.retrieval != "off"

    def bind_model(self, model) -> None:
        """Resolve ``profile`` (object, JSON path, or the embedded model's cached profile) and check it."""
        from heterocache.models import is_embedded, load_embedded_tokenizer
        from heterocache.profiling.profile import HeadProfile

        if isinstance(self.profile, (str, Path)):
            self.profile = HeadProfile.load(self.profile)
        elif self.profile is None:
            if not is_embedded(model):
                raise ValueError("heterocache needs profile= for this model: run `heterocache profile --model M "
                                 "--out profile.json` or hc.profile_heads(model, tokenizer) once, then pass it")
            from heterocache.profiling.api import profile_heads

            self.profile = profile_heads(model, load_embedded_tokenizer())
        elif not isinstance(self.profile, HeadProfile):
            raise ValueError(f"profile must be a HeadProfile or a JSON path, got {type(self.profile).__name__}")
        self.profile.check_model(model)

    def setup(self, cache) -> None:
        from heterocache.retrieval import Runtime

        if self.retrieval not in ("async", "sync", "off"):
            raise ValueError(f"retrieval={self.retrieval!r} is invalid; choose 'async', 'sync' or 'off'")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} must be an integer >= 1")
        if self.profile is None:
            raise ValueError("heterocache needs profile=: a HeadProfile or a JSON path "
                             "(make one with hc.profile_heads(model, tokenizer) or `heterocache profile`)")
        geometry = cache.model_geometry
        if (self.profile.n_layers, self.profile.n_kv_heads) != (geometry["n_layers"], geometry["n_kv_heads"]):
            raise ValueError(f"profile has {self.profile.n_layers} layers x {self.profile.n_kv_heads} KV heads; "
                             f"the model has {geometry['n_layers']} x {geometry['n_kv_heads']}")
        cache.method_state["runtime"] = Runtime(self, cache)

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        runtime = ctx.state["runtime"]
        budget, full = runtime.layer_plan(ctx)  # (B, H) long, (B, H) bool
        keep = ctx.keep_all()
        if bool(full.all()):
            return keep
        scores = window_votes(ctx, self.window, self.kernel, self.pooling, "mean")
        chosen = select_with_forced(scores, ctx.valid, budget, self.sinks, self.recent(budget))
        keep = torch.where(full[..., None], keep, chosen)
        runtime.after_prefill_select(ctx, full, budget)
        return keep

    def recent(self, budget: torch.Tensor) -> torch.Tensor:
        """Most recent prompt tokens each compressed head always keeps: ``(B, H)`` long."""
        return torch.clamp((budget * self.recent_fraction).long(), min=self.window)

    def last_query_scores(self, ctx: PrefillContext) -> torch.Tensor:
        """Pooled attention of the last prompt token per KV head ``(B, H, T)`` (drift reference)."""
        probs = window_attention(ctx.queries, ctx.keys, 1, ctx.scaling, ctx.valid)[:, :, 0]
        return pool1d(reduce_gqa(probs, ctx.n_kv_heads, "mean"), 5, "avg")

    def before_decode_attention(self, layer, cache) -> None:
        cache.method_state["runtime"].apply_pending(layer)

    def on_decode_step(self, ctx: DecodeContext) -> None:
        if self.retrieval != "off":
            ctx.state["runtime"].observe(ctx)

    def drift_k(self, satellite_budget: torch.Tensor) -> torch.Tensor:
        """``(B,)`` size of the compared top-k sets given the satellites' budgets ``(B, S)``."""
        if self.topk is None:
            return satellite_budget.max(dim=-1).values.clamp(min=1, max=1024)
        return torch.full_like(satellite_budget[:, 0], int(self.topk))
