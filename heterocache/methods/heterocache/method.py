"""HeteroCache (ACL 2026): heterogeneous per-head budgets + drift-triggered retrieval.

Roles come from a :class:`~heterocache.profiling.profile.HeadProfile`: volatile and pivot heads
keep every token; anchors keep a fixed set chosen at prefill; satellites keep a set on the device
and their full prefill K/V in a slower tier, refreshed from it when their pivot's attention drifts
(``runtime.py``; tiers in ``tiers.py``). Budgets (:func:`heterocache.budget.allocate`) follow
docs/DESIGN.md s.2: full heads take ``T`` each and anchors + satellites share the rest in
proportion to their profile weights (less stable heads get more), water-filled so the total is
exactly ``round(keep * T * n_layers * n_kv_heads)``. Hybrid models: heads of sliding-window layers
have the fixed role ``"sliding"`` (not profiled): compressed, capped at ``min(T, W - 1)``, scored
like anchors over the window without sinks; stars and the drift runtime cover full-attention layers only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from heterocache.budget import allocate
from heterocache.methods.base import DecodeContext, Method, PrefillContext, check_choice, check_range
from heterocache.methods.heterocache.runtime import Runtime, Settings, recent_tokens
from heterocache.methods.heterocache.tiers import TIERS, check_directory
from heterocache.methods.scoring import select_with_forced
from heterocache.methods.snapkv import check_window_options, window_votes


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

    def validate(self) -> None:
        from heterocache.profiling.profile import HeadProfile

        if self.profile is not None and not isinstance(self.profile, (str, Path, HeadProfile)):
            raise ValueError(f"profile must be a HeadProfile or a JSON path, got {type(self.profile).__name__}")
        check_range("steps", self.steps, 1)
        if self.topk is not None and (isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1):
            raise ValueError(f"topk={self.topk!r} must be None or an integer >= 1")
        if self.drift_threshold != "auto":
            if isinstance(self.drift_threshold, bool) or not isinstance(self.drift_threshold, (int, float)):
                raise ValueError(f"drift_threshold={self.drift_threshold!r} must be a number or 'auto'")
            check_range("drift_threshold", self.drift_threshold, 0)
        check_choice("retrieval", self.retrieval, ("async", "sync", "off"))
        check_choice("offload", self.offload, TIERS)
        if self.offload_dir is not None:
            if self.offload != "disk":
                raise ValueError(f"offload_dir is only used with offload='disk' (offload={self.offload!r})")
            check_directory(self.offload_dir)
        check_choice("weighting", self.weighting, ("profile", "uniform"))
        check_range("max_full_share", self.max_full_share, 0, 1, low_open=True)
        check_window_options(self.window, self.kernel, self.pooling)
        check_range("sinks", self.sinks, 0)
        check_range("recent_fraction", self.recent_fraction, 0, 1)

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
        self.profile.check_model(model)

    def setup(self, cache) -> None:
        if self.profile is None:
            raise ValueError("heterocache needs profile=: a HeadProfile or a JSON path "
                             "(make one with hc.profile_heads(model, tokenizer) or `heterocache profile`)")
        geometry = cache.model_geometry
        if (self.profile.n_layers, self.profile.n_kv_heads) != (geometry["n_layers"], geometry["n_kv_heads"]):
            raise ValueError(f"profile has {self.profile.n_layers} layers x {self.profile.n_kv_heads} KV heads; "
                             f"the model has {geometry['n_layers']} x {geometry['n_kv_heads']}")
        if self.profile.layer_windows() != list(cache.layer_windows):
            raise ValueError(f"profile has sliding windows {self.profile.layer_windows()} per layer; the cache has "
                             f"{list(cache.layer_windows)}: profile this model with profile_heads()")
        self.close()
        self.plans: dict[tuple[float, int], tuple[list[list[int]], list[list[bool]]]] = {}
        settings = Settings(self.steps, self.topk, self.drift_threshold, self.retrieval, self.offload,
                            self.offload_dir, self.sinks, self.window, self.recent_fraction)
        self.runtime = Runtime(settings, self.profile) if self.retrieval != "off" else None

    def plan(self, keep: float, prompt_len: int) -> tuple[list[list[int]], list[list[bool]]]:
        """``(budgets [L][H], full [L][H])`` for one prompt length (computed once per cache)."""
        key = (keep, prompt_len)
        if key not in self.plans:
            self.plans[key] = allocate(self.profile, keep, prompt_len, self.weighting, self.sinks + 1,
                                       self.max_full_share)
        return self.plans[key]

    def budgets(self, keep: float, prompt_len: int, n_layers: int, n_kv_heads: int) -> list[list[int]]:
        return self.plan(keep, prompt_len)[0]

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        full = torch.tensor([self.plan(ctx.keep, n)[1][ctx.layer_idx] for n in ctx.prompt_lengths.tolist()],
                            dtype=torch.bool, device=ctx.keys.device)  # (B, H)
        keep = ctx.keep_all()
        if bool(full.all()):
            return keep
        scores = window_votes(ctx, self.window, self.kernel, self.pooling, "mean")
        recent = recent_tokens(ctx.budget, self.window, self.recent_fraction)
        sinks = 0 if ctx.window is not None else self.sinks  # the model's first tokens are out of reach
        chosen = select_with_forced(scores, ctx.valid, ctx.budget, sinks, recent)
        keep = torch.where(full[..., None], keep, chosen)
        if self.runtime is not None and ctx.window is None:
            self.runtime.watch(ctx, full)
        return keep

    def before_decode_attention(self, layer, queries) -> None:
        if self.runtime is not None:
            self.runtime.apply_pending(layer)

    def on_decode_step(self, ctx: DecodeContext) -> None:
        if self.runtime is not None:
            self.runtime.observe(ctx)

    def stats(self) -> dict[str, Any]:
        return self.runtime.stats() if self.runtime is not None else {}

    def close(self) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close()
            self.runtime = None
