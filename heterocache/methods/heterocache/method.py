"""HeteroCache: per-head compressed KV cache with retrieval from a slower tier.

Two mechanisms, one option apart (``retrieval``):

- ``"dynamic"`` (default, measured best on our models; docs/DESIGN.md s.5): every compressed head
  keeps a static part (sinks, recent tokens, the best tokens by expected attention of future
  queries, ``expected.py``) and ``dynamic_share`` of its budget as slots refilled before every
  decode step with the prompt tokens that step's own queries point at, scored on the device from
  page summaries and fetched from the head's full prompt K/V in the slow tier (``dynamic.py``).
  No head profile is needed; budgets are uniform (or profile-weighted with ``weighting="profile"``).
- ``"async"`` / ``"sync"`` / ``"off"``: the paper's mechanism (ACL 2026, spec/heterocache.md).
  Roles come from a :class:`~heterocache.profiling.profile.HeadProfile`: volatile and pivot heads
  keep every token; anchors keep a fixed set chosen at prefill; satellites keep a set on the device
  and their full prefill K/V in a slower tier, refreshed from it when their pivot's attention
  drifts (``drift.py``; tiers in ``tiers.py``). Budgets (:func:`heterocache.budget.allocate`):
  full heads take ``T`` each, anchors + satellites share the rest by profile weights.

Both follow docs/DESIGN.md s.2 (the kept prompt entries sum to ``round(keep * T * L * H)``; in
dynamic mode minus the token-equivalent of the page summaries, so the device bytes match). Hybrid
models: heads of sliding-window layers are compressed over their window without sinks, never
retrieve, and (paper mode) have the fixed role ``"sliding"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from heterocache.budget import allocate, total_budget, weighted_budgets
from heterocache.methods.base import DecodeContext, Method, PrefillContext, check_choice, check_range
from heterocache.methods.heterocache.drift import Runtime, Settings, recent_tokens
from heterocache.methods.heterocache.dynamic import DynamicRetrieval, DynamicSettings
from heterocache.methods.heterocache.expected import expected_attention, rope_inv_freq
from heterocache.methods.scoring import select_with_forced
from heterocache.methods.snapkv import check_window_options, window_votes
from heterocache.retrieval.index import sketch_tokens, summary_tokens
from heterocache.retrieval.tiers import TIERS, check_directory

DRIFT_MODES = ("async", "sync", "off")
# options of one mechanism only (the rest, e.g. sinks, window, offload, weighting, scorer, serve both)
DYNAMIC_ONLY = ("dynamic_share", "index", "page", "rank", "summary_dtype", "stick", "page_score", "refill",
                "refresh_drift", "prefetch")
PAPER_ONLY = ("steps", "topk", "drift_threshold", "max_full_share")
SUMMARY_DTYPES = ("int8", "bfloat16", "float16", "float32")



def layer_uniform(total: int, n_layers: int, n_heads: int) -> list[list[int]]:
    """``total`` tokens as equal as possible with every head of a layer equal, except the last layer's
    first ``total % n_heads`` heads (one token more): the dynamic runtime's fast block refill needs
    equal heads within a layer (dynamic.py ``_layout``).

    >>> layer_uniform(20, 3, 3)
    [[2, 2, 2], [2, 2, 2], [3, 3, 2]]
    """
    per_head, left = divmod(total, n_layers * n_heads)
    budgets = [[per_head + (layer < left // n_heads)] * n_heads for layer in range(n_layers)]
    for head in range(left % n_heads):
        budgets[-1][head] += 1
    return budgets


PAGE_SIZES = (4, 8, 16, 32, 64)  # page="auto" candidates (index="pages")
PAGE_RULE_KV_BYTES = 4  # page="auto" prices the index against KV elements of at least this many bytes
SKETCH_RANKS = (16, 8, 4)  # rank="auto" candidates
REFILLS = ("auto", "native", "torch")
PAGE_SCORES = ("lse", "max")
PREFETCH = ("none", "speculate", "verify", "speculate_late")


@dataclass
class HeteroCache(Method):
    """HeteroCache: per-head budgets, each head's own retrieval from the slow tier (see the module).

    Parameters
    ----------
    retrieval : str
        ``"dynamic"`` (default): per-step query-driven refill of each compressed head's dynamic
        slots. The paper's drift-triggered satellite refresh: ``"async"`` (worker thread / CUDA
        copy stream), ``"sync"``; ``"off"``: the paper's static heterogeneous cache.
    dynamic_share : float
        Dynamic mode: share of each compressed head's budget that is refilled every step (0.75).
    index : str
        Dynamic mode: the device-resident index the step's queries are scored against: ``"pages"``
        (mean key of each page of ``page`` selectable prompt tokens; whole pages are fetched) or
        ``"sketch"`` (every paged key on its head's top-``rank`` right singular vectors; a page scores
        by ``page_score``). ``"auto"`` (default): the sketch where a rank-16 one costs at most a sixth
        of ``keep`` (keep >= 0.19 for an fp32 cache, head_dim 64), else pages (measured: README). Its
        bytes are paid from the budget.
    page : int | str
        Dynamic mode: prompt tokens per page (fetched as one block). ``"auto"`` (default): 8 with the
        sketch; with page means the smallest of 4, 8, 16, 32, 64 whose means cost at most a sixth of
        ``keep`` (int8 means of an fp32 cache: 8 at keep >= 0.094, 16 at keep >= 0.047).
    rank : int | str
        Dynamic mode, ``index="sketch"``: sketch rank. ``"auto"`` (default): the largest of 16, 8, 4
        whose sketch costs at most a sixth of ``keep`` (int8, head_dim 64, fp32 cache: 16 at
        keep >= 0.19, 8 at keep >= 0.094).
    summary_dtype : str
        Dynamic mode: storage dtype of the index (``"int8"``, default: each channel rounded to 255
        levels of its own fp32 scale, which multiplies the queries instead; ``"bfloat16"``,
        ``"float16"``, ``"float32"``); its bytes are paid out of the budget.
    stick : float
        Dynamic mode: score bonus of pages already resident (in units of the scaled logit; 0: none);
        larger values move fewer bytes per step (measured at keep 0.25: 0.5 moves 43% fewer bytes at
        about the same KL but answered 8/9 question-after pass keys instead of 9/9;
        docs/research/quality.md).
    page_score : str
        Dynamic mode, ``index="sketch"``: how a page's tokens' sketched logits make its score:
        ``"lse"`` (default: their log-sum-exp, the page's estimated attention mass) or ``"max"`` (its
        best token). Measured at keep 0.25: lse 0.0146 / 0.932, max 0.0158 / 0.911 (KL / top-1), both
        9/9 question-after pass keys.
    refresh_drift : float
        Dynamic mode: the drift gate. A sequence (batch row x KV head) refills its dynamic slots only
        when its step's queries, projected as the index scores them, moved by more than this relative
        distance (Frobenius norm, over the group's query rows) since its last refill; otherwise it keeps
        its pages and the step skips its index scan and copies. 0: every step. Default 0.3, measured
        (7,500-token essay, keep 0.25): ~75% of refills skipped, fidelity unchanged (KL 0.0149 vs
        0.0146, top-1 0.943 vs 0.932 at keep 0.25; 0.0559 vs 0.0556 at 0.1), 9/9 question-after pass
        keys; 0.4 skips ~90% but the KL rises (docs/research/quality.md).
    prefetch : str
        Dynamic mode: when a layer's refill is chosen. ``"none"`` (default): with the layer's own query,
        right before its attention (every byte on the critical path). ``"speculate"``: when the layer
        before it starts, from that layer's input hidden state pushed through this layer's input norm, q
        projection and RoPE (InfiniGen's speculation; ``retrieval/speculate.py``), so the bytes are issued a
        whole layer before the attention that reads them (counted as prefetched; on a GPU the copy can
        overlap the previous layer). The first retrieving layer and multi-token steps keep their own
        query. ``"verify"``: speculate, then the layer's true query runs the drift gate against the
        speculated projections and refills again where they differ by more than ``refresh_drift``
        (those bytes critical). ``"speculate_late"``: speculate from the previous layer's post-attention
        residual (its input plus its attention output), issued before that layer's MLP: a closer estimate,
        overlapped with the MLP only. Measured (README, docs/research/transfer.md): speculation moves ~28x
        fewer bytes on the critical path at a higher KL.
    refill : str
        Dynamic mode, CPU: how a layer's dynamic slots are refilled in the block layout. ``"auto"``
        (default): the fused C routine of ``heterocache/native`` (compiled on first use) where it
        applies, else PyTorch ops; ``"native"``: the same, an error where it cannot be used (no C
        compiler, a non-CPU device); ``"torch"``: always the PyTorch ops (its reference).
    scorer : str | None
        Static prefill scores of compressed heads: ``"expected"`` (expected attention of future
        queries x value norm; needs RoPE; default in dynamic mode) or ``"votes"`` (SnapKV window
        votes; default in the paper's modes and on sliding-window layers).
    expected_window, expected_future : int
        Expected attention: prompt queries whose statistics are used (64) and future positions the
        RoPE rotation is averaged over (512).
    profile : HeadProfile | str | None
        The head profile (object or JSON path); the paper's modes need it (``None``: the cached
        profile of the embedded model), dynamic mode only with ``weighting="profile"``.
    steps : int
        Drift-check period in decode tokens (paper: 5).
    topk : int | None
        Size of the pivot's attention set compared between checks. ``None``: the largest budget
        among the pivot's satellites (at most 1024), i.e. the set that a refresh would fetch; the
        paper's 1024 exceeds most budgets at short contexts and then never sees drift.
    drift_threshold : float | str
        Overlap below which satellites are refreshed (paper: 0.5). ``"auto"``: per pivot, its own
        calibrated stability ``S_p`` (the overlap it typically keeps), so only unusual drift fires.
    offload : str
        Slow tier of the full prompt copies (dynamic: every compressed head; paper: satellites):
        ``"host"``, ``"disk"`` or ``"none"`` (device).
    offload_dir : str | None
        Directory for the disk tier (default: a temporary directory removed on reset).
    weighting : str | None
        Budget split over compressed heads: ``"profile"`` (stability weights; default in the
        paper's modes) or ``"uniform"`` (default in dynamic mode).
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
    description = ("HeteroCache: per-head static part + slots refilled every step from the slow tier "
                   "(retrieval='async': the paper's drift-triggered satellites)")

    retrieval: str = "dynamic"
    dynamic_share: float = 0.75
    index: str = "auto"
    page: Any = "auto"
    rank: Any = "auto"
    summary_dtype: str = "int8"
    stick: float = 0.0
    page_score: str = "lse"
    refill: str = "auto"
    refresh_drift: float = 0.3
    prefetch: str = "none"
    scorer: Any = None
    expected_window: int = 64
    expected_future: int = 512
    profile: Any = None
    steps: int = 5
    topk: Any = None
    drift_threshold: Any = 0.5
    offload: str = "host"
    offload_dir: Any = None
    weighting: Any = None
    max_full_share: float = 0.5
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    sinks: int = 4
    recent_fraction: float = 0.0

    def __post_init__(self) -> None:
        self.inv_freq: torch.Tensor | None = None  # RoPE frequencies (bind_model)
        self.kv_bytes = 4  # bytes per key/value element (bind_model)
        self.head_dim = 64  # setup() reads the cache's
        self.model = None  # bind_model: prefetch="speculate" hooks its decoder layers

    @property
    def dynamic(self) -> bool:
        return self.retrieval == "dynamic"

    def validate(self) -> None:
        from heterocache.profiling.profile import HeadProfile

        check_choice("retrieval", self.retrieval, ("dynamic", *DRIFT_MODES))
        if self.profile is not None and not isinstance(self.profile, (str, Path, HeadProfile)):
            raise ValueError(f"profile must be a HeadProfile or a JSON path, got {type(self.profile).__name__}")
        check_range("dynamic_share", self.dynamic_share, 0, 1)
        check_choice("index", self.index, ("auto", "pages", "sketch"))
        for name in ("page", "rank"):
            value = getattr(self, name)
            if value != "auto":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{name}={value!r} must be 'auto' or an integer >= 1")
                check_range(name, value, 1)
        check_choice("summary_dtype", self.summary_dtype, SUMMARY_DTYPES)
        check_range("stick", self.stick, 0)
        check_range("refresh_drift", self.refresh_drift, 0)
        check_choice("page_score", self.page_score, PAGE_SCORES)
        check_choice("refill", self.refill, REFILLS)
        check_choice("prefetch", self.prefetch, PREFETCH)
        if self.scorer is not None:
            check_choice("scorer", self.scorer, ("expected", "votes"))
        check_range("expected_window", self.expected_window, 1)
        check_range("expected_future", self.expected_future, 1)
        check_range("steps", self.steps, 1)
        if self.topk is not None and (isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1):
            raise ValueError(f"topk={self.topk!r} must be None or an integer >= 1")
        if self.drift_threshold != "auto":
            if isinstance(self.drift_threshold, bool) or not isinstance(self.drift_threshold, (int, float)):
                raise ValueError(f"drift_threshold={self.drift_threshold!r} must be a number or 'auto'")
            check_range("drift_threshold", self.drift_threshold, 0)
        check_choice("offload", self.offload, TIERS)
        if self.offload_dir is not None:
            if self.offload != "disk":
                raise ValueError(f"offload_dir is only used with offload='disk' (offload={self.offload!r})")
            check_directory(self.offload_dir)
        if self.weighting is not None:
            check_choice("weighting", self.weighting, ("profile", "uniform"))
        check_range("max_full_share", self.max_full_share, 0, 1, low_open=True)
        check_window_options(self.window, self.kernel, self.pooling)
        check_range("sinks", self.sinks, 0)
        check_range("recent_fraction", self.recent_fraction, 0, 1)
        self._check_mode_options()

    def _check_mode_options(self) -> None:
        """Options of one mechanism set with the other are refused (they would be ignored)."""
        if self.dynamic:
            foreign, mine, other = PAPER_ONLY, "'dynamic'", "retrieval='async', 'sync' or 'off'"
        else:
            foreign, mine, other = DYNAMIC_ONLY, repr(self.retrieval), "retrieval='dynamic'"
        defaults = {f.name: f.default for f in fields(self)}
        changed = sorted(name for name in foreign if getattr(self, name) != defaults[name])
        if changed:
            raise ValueError(f"option(s) {changed} of heterocache apply to {other}, not retrieval={mine}; "
                             "drop them or choose that mode")

    @property
    def split(self) -> str:
        return self.weighting or ("uniform" if self.dynamic else "profile")

    def bind_model(self, model) -> None:
        """Resolve ``profile`` (object, JSON path, or the embedded model's cached profile) when this mode
        uses it, and read the model's RoPE frequencies and KV element size."""
        from heterocache.models import is_embedded, load_embedded_tokenizer
        from heterocache.profiling.profile import HeadProfile

        self.inv_freq = rope_inv_freq(model)
        self.kv_bytes = next(model.parameters()).element_size()
        if self.dynamic and self.prefetch != "none":
            from heterocache.retrieval.speculate import check_model

            check_model(model)
            self.model = model
        if self.scorer == "expected" and self.inv_freq is None:
            raise ValueError("scorer='expected' needs a RoPE model (rotary_emb.inv_freq); use scorer='votes'")
        if self.dynamic and self.split == "uniform" and self.profile is None:
            return  # dynamic mode with uniform budgets needs no profile
        if isinstance(self.profile, (str, Path)):
            self.profile = HeadProfile.load(self.profile)
        elif self.profile is None:
            if not is_embedded(model):
                raise ValueError("heterocache needs profile= for this model: run `heterocache profile --model M "
                                 "--out profile.json` or hc.profile_heads(model, tokenizer) once, then pass it "
                                 "(or use retrieval='dynamic' with weighting='uniform', which needs none)")
            from heterocache.profiling.api import profile_heads

            self.profile = profile_heads(model, load_embedded_tokenizer())
        self.profile.check_model(model)

    def setup(self, cache) -> None:
        needs_profile = not self.dynamic or self.split == "profile"
        if needs_profile and self.profile is None:
            raise ValueError("heterocache needs profile=: a HeadProfile or a JSON path "
                             "(make one with hc.profile_heads(model, tokenizer) or `heterocache profile`)")
        if self.profile is not None:
            geometry = cache.model_geometry
            if (self.profile.n_layers, self.profile.n_kv_heads) != (geometry["n_layers"], geometry["n_kv_heads"]):
                raise ValueError(f"profile has {self.profile.n_layers} layers x {self.profile.n_kv_heads} KV heads; "
                                 f"the model has {geometry['n_layers']} x {geometry['n_kv_heads']}")
            if self.profile.layer_windows() != list(cache.layer_windows):
                raise ValueError(f"profile has sliding windows {self.profile.layer_windows()} per layer; the cache "
                                 f"has {list(cache.layer_windows)}: profile this model with profile_heads()")
        self.close()
        self.layer_windows = list(cache.layer_windows)
        self.n_kv_heads, self.head_dim = cache.n_kv_heads, cache.head_dim
        self.plans: dict[tuple[float, int], tuple[list[list[int]], list[list[bool]]]] = {}
        self.retrieving: dict[tuple[float, int], bool] = {}  # dynamic mode: prompt lengths served with retrieval
        self.runtime: Runtime | DynamicRetrieval | None = None
        if self.dynamic:
            self.runtime = DynamicRetrieval(DynamicSettings(self.resolved_index(cache.keep),
                                                            self.resolved_page(cache.keep),
                                                            self.resolved_rank(cache.keep),
                                                            float(self.stick),
                                                            getattr(torch, self.summary_dtype), self.offload,
                                                            self.offload_dir, self.refill, self.page_score,
                                                            float(self.refresh_drift), self.prefetch))
            if self.prefetch != "none":
                if self.model is None:
                    raise ValueError("prefetch='speculate' needs the model: build the cache with hc.make_cache")
                self.runtime.bind(self.model, cache)
        elif self.retrieval != "off":
            settings = Settings(self.steps, self.topk, self.drift_threshold, self.retrieval, self.offload,
                                self.offload_dir, self.sinks, self.window, self.recent_fraction)
            self.runtime = Runtime(settings, self.profile)

    # --- budgets -------------------------------------------------------------------------------
    def plan(self, keep: float, prompt_len: int) -> tuple[list[list[int]], list[list[bool]]]:
        """``(budgets [L][H], full [L][H])`` for one prompt length (computed once per cache)."""
        key = (keep, prompt_len)
        if key not in self.plans:
            if self.dynamic:
                self.plans[key] = self._dynamic_plan(keep, prompt_len)
            else:
                self.plans[key] = allocate(self.profile, keep, prompt_len, self.split, self.sinks + 1,
                                           self.max_full_share)
        return self.plans[key]

    def _dynamic_plan(self, keep: float, prompt_len: int) -> tuple[list[list[int]], list[list[bool]]]:
        """No full heads; the total minus the index's token-equivalent, split uniformly (or by profile
        weights). Where that leaves a head fewer than ``sinks + window + 1`` tokens or fewer than two
        pages of dynamic slots (short prompts: the index costs more than it can pay back), the prompt
        is served without retrieval (:meth:`retrieves`): no index, the whole total for static tokens,
        sinks and recent tokens cut to what the budget pays for (``forced_keep``)."""
        n_layers, n_heads = len(self.layer_windows), self.n_kv_heads
        if keep >= 1.0:  # FullKV: nothing to retrieve, no summaries
            return [[prompt_len] * n_heads for _ in range(n_layers)], [[True] * n_heads for _ in range(n_layers)]
        heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
        total = total_budget(keep, prompt_len, n_layers, n_heads)
        retrieving = sum(window is None for window in self.layer_windows) * n_heads
        after_index = total - math.ceil(self._index_tokens(keep, prompt_len) * retrieving)
        floor = min(prompt_len, self.sinks + self.window + 1)
        per_head = after_index // len(heads)
        dynamic = retrieving > 0 and after_index >= floor * len(heads) and \
            int(per_head * self.dynamic_share) // self.resolved_page(keep) >= 2
        self.retrieving[(keep, prompt_len)] = dynamic
        if dynamic:
            total = after_index
        else:
            floor = 0
        if self.split == "profile":
            records = {(h.layer, h.head): h for row in self.profile.heads for h in row}
            weights = [records[key].weight or 1.0 for key in heads]
            shares = weighted_budgets(total, weights, [prompt_len] * len(heads), floor)
            budgets = [shares[layer * n_heads:(layer + 1) * n_heads] for layer in range(n_layers)]
        else:
            budgets = layer_uniform(min(total, len(heads) * prompt_len), n_layers, n_heads)
        return budgets, [[False] * n_heads for _ in range(n_layers)]

    def _index_tokens(self, keep: float, prompt_len: int) -> float:
        """Device cost of one retrieving head's index in kept-token units."""
        if self.resolved_index(keep) == "sketch":
            rank = min(self.resolved_rank(keep), self.head_dim, prompt_len)
            return sketch_tokens(prompt_len, rank, self.head_dim, self.summary_element_size, self.kv_bytes)
        return summary_tokens(prompt_len, self.resolved_page(keep), self.summary_element_size, self.kv_bytes)

    def retrieves(self, keep: float, prompt_len: int) -> bool:
        """Dynamic mode: whether prompts of this length get dynamic slots and an index (see ``_dynamic_plan``)."""
        self.plan(keep, prompt_len)
        return self.retrieving.get((keep, prompt_len), False)

    @property
    def summary_element_size(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.summary_dtype)).element_size()

    def resolved_index(self, keep: float) -> str:
        """``index="auto"``: the sketch where a rank-16 one fits in ``keep / 6`` (keep >= 0.19 for int8,
        head_dim 64, an fp32 cache), else page means. Measured (README, docs/research/quality.md): at
        keep 0.25 the sketch answers the question-after pass keys (9/9, page means 7/9) at a somewhat
        higher KL; at keep 0.1 page means are far more faithful than a rank-8 sketch."""
        if self.index != "auto":
            return self.index
        share = SKETCH_RANKS[0] * self.summary_element_size / (2 * self.head_dim * self.kv_bytes)
        return "sketch" if share <= keep / 6 else "pages"

    def resolved_page(self, keep: float) -> int:
        """``page="auto"``: the smallest of ``PAGE_SIZES`` whose summaries cost at most ``keep / 6`` of a
        KV cache of at least 4-byte elements (with the sketch, whose cost does not depend on the page:
        8). A 2-byte cache thus gets the pages an fp32 one gets (4 at keep 0.25, 8 at 0.1), although its
        index then costs up to ``keep / 3`` of its own bytes: measured on Qwen2.5-Coder-0.5B in bf16
        (README "Long context"), the pages the byte rule gave there (8 and 16) were worse at 8K-16K
        (fidelity KL at 16K 0.0179 -> 0.0084 at keep 0.25, 0.0660 -> 0.0600 at 0.1; pass keys after
        compression 1/3 -> 2/3 at 0.1)."""
        if self.page != "auto":
            return self.page
        if self.resolved_index(keep) == "sketch":
            return 8
        kv_bytes = max(self.kv_bytes, PAGE_RULE_KV_BYTES)
        for page in PAGE_SIZES:
            if self.summary_element_size / (2 * page * kv_bytes) <= keep / 6:
                return page
        return PAGE_SIZES[-1]

    def resolved_rank(self, keep: float) -> int:
        """``rank="auto"``: the largest of ``SKETCH_RANKS`` whose sketch costs at most ``keep / 6``."""
        if self.rank != "auto":
            return self.rank
        for rank in SKETCH_RANKS:
            if rank * self.summary_element_size / (2 * self.head_dim * self.kv_bytes) <= keep / 6:
                return rank
        return SKETCH_RANKS[-1]

    def budgets(self, keep: float, prompt_len: int, n_layers: int, n_kv_heads: int) -> list[list[int]]:
        return self.plan(keep, prompt_len)[0]

    # --- prefill -------------------------------------------------------------------------------
    def scores(self, ctx: PrefillContext) -> torch.Tensor:
        """Static prefill scores ``(B, Hkv, T)``: expected attention or SnapKV votes (see ``scorer``)."""
        scorer = self.scorer or ("expected" if self.dynamic and self.inv_freq is not None else "votes")
        if scorer == "expected" and ctx.window is None:
            return expected_attention(ctx.queries, ctx.keys, ctx.values, ctx.valid, ctx.scaling, self.inv_freq,
                                      self.expected_window, self.expected_future)
        return window_votes(ctx, self.window, self.kernel, self.pooling, "mean")

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        full = torch.tensor([self.plan(ctx.keep, n)[1][ctx.layer_idx] for n in ctx.prompt_lengths.tolist()],
                            dtype=torch.bool, device=ctx.keys.device)  # (B, H)
        keep = ctx.keep_all()
        if bool(full.all()) or ctx.keeps_everything():
            return keep
        scores = self.scores(ctx)
        recent = recent_tokens(ctx.budget, self.window, self.recent_fraction)
        sinks = 0 if ctx.window is not None else self.sinks  # the model's first tokens are out of reach
        rows = [] if not isinstance(self.runtime, DynamicRetrieval) or ctx.window is not None else \
            [row for row, n in enumerate(ctx.prompt_lengths.tolist()) if self.retrieves(ctx.keep, n)]
        if rows:
            dynamic_count = (ctx.budget.float() * self.dynamic_share).long()
            page = self.runtime.settings.page  # whole pages are fetched
            dynamic_count = dynamic_count // page * page
            if len(rows) < ctx.budget.shape[0]:  # rows served without retrieval: all static
                retrieving = torch.zeros(ctx.budget.shape[0], dtype=torch.bool, device=dynamic_count.device)
                retrieving[rows] = True
                dynamic_count = dynamic_count * retrieving[:, None]
            static = select_with_forced(scores, ctx.valid, ctx.budget - dynamic_count, sinks, recent)
            # + the first dynamic pages (the next best prefill scores; replaced at the first decode step)
            return static | self.runtime.watch(ctx, list(range(ctx.n_kv_heads)), static, dynamic_count, scores, rows)
        chosen = select_with_forced(scores, ctx.valid, ctx.budget, sinks, recent)
        keep = torch.where(full[..., None], keep, chosen)
        if isinstance(self.runtime, Runtime) and ctx.window is None:
            self.runtime.watch(ctx, full)
        return keep

    # --- decode --------------------------------------------------------------------------------
    def after_store(self, layer) -> None:
        if isinstance(self.runtime, DynamicRetrieval):
            self.runtime.after_store(layer)

    def before_decode_attention(self, layer, queries) -> None:
        if isinstance(self.runtime, DynamicRetrieval):
            self.runtime.before_attention(layer, queries)
        elif self.runtime is not None:
            self.runtime.apply_pending(layer)

    def on_decode_step(self, ctx: DecodeContext) -> None:
        if isinstance(self.runtime, Runtime):
            self.runtime.observe(ctx)

    def on_batch_select(self, layer, indices: torch.Tensor) -> None:
        if self.runtime is not None:
            self.runtime.select_rows(layer, indices)

    def on_crop(self, layer, length: int) -> None:
        if self.runtime is not None:
            self.runtime.crop(layer, length)

    def stats(self) -> dict[str, Any]:
        return self.runtime.stats() if self.runtime is not None else {}

    def close(self) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close()
            self.runtime = None
