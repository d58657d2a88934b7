"""Quest (Tang et al., ICML 2024): query-aware page selection, every step (spec/baselines.md s.7).

Each retrieving head's prompt is cut into pages of ``page`` (16) tokens; per page and channel the
device keeps the element-wise min and max key (in the cache dtype). A step's query row ``q`` bounds
a page's best logit by ``U_p = sum_c max(q_c * max_pc, q_c * min_pc)`` (>= the largest ``q . k`` in
the page); GQA: the max over the group's rows; the best pages are attended, nothing is evicted.
The first ``dense_layers`` (2) full-attention layers keep every token (the reference code).

Placement (``placement``): ``"device"`` is Quest as published: every prompt token stays on the
device (here: the slow-tier copy lives on the device, ``offload="none"``, and counts as device
bytes), so memory is NOT saved, only the attention reads fewer tokens; its metadata is not paid
from the budget. ``"host"`` / ``"disk"`` keep the pages in the slow tier and the chosen ones in the
device's dynamic slots; the metadata (``2 / page`` of the keys' bytes) is paid from the budget
(docs/DESIGN.md s.2). Budgets: dense heads ``T``, the others share the rest equally (a page of a
head's slots pays for the few remainder tokens that do not fill a page, kept statically). Where a
row's budget cannot pay for the metadata plus two pages per head, the dense layers go first
(documented deviation), then retrieval: the row keeps 4 sinks + its most recent tokens.
Sliding-window layers keep their most recent tokens (no pages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from heterocache.budget import split_evenly, total_budget
from heterocache.methods.base import PrefillContext, check_choice, check_range
from heterocache.methods.scoring import select_with_forced, window_attention
from heterocache.retrieval.policy import RetrievingMethod, grouped_queries
from heterocache.retrieval.slots import PagedSlots, choose_units
from heterocache.retrieval.tiers import check_directory

PLACEMENTS = {"device": "none", "host": "host", "disk": "disk"}
SINKS = 4  # static fallback of short prompts


@dataclass
class MinMaxIndex:
    """Quest's page metadata: ``mins``, ``maxs (n, P, D)`` (the cache dtype)."""

    mins: torch.Tensor
    maxs: torch.Tensor

    def page_scores(self, queries: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``(n, P)``: the max over the rows of ``queries (n, R, D)`` of each page's upper bound, + ``base``.
        ``max(q * a, q * b)`` with ``a >= b`` is ``q * a`` for ``q >= 0`` and ``q * b`` otherwise."""
        q = queries.float()
        bound = q.clamp(min=0) @ self.maxs.float().transpose(1, 2) + q.clamp(max=0) @ self.mins.float().transpose(1, 2)
        return bound.amax(1) + base

    def select_rows(self, src: torch.Tensor) -> None:
        self.mins, self.maxs = self.mins.index_select(0, src), self.maxs.index_select(0, src)

    def nbytes(self) -> int:
        return 2 * self.mins.numel() * self.mins.element_size()


def page_bounds(paged_keys: torch.Tensor, page: int) -> MinMaxIndex:
    """``paged_keys (n, P * page, D)`` (page layout) -> per-page element-wise min / max keys."""
    n, length, d = paged_keys.shape
    pages = paged_keys.view(n, length // page, page, d)
    return MinMaxIndex(pages.amin(2).contiguous(), pages.amax(2).contiguous())


@dataclass
class Quest(RetrievingMethod):
    """Quest: per-step top pages by a min/max key bound (see the module).

    Parameters
    ----------
    page : int
        Tokens per page (paper: 16).
    dense_layers : int
        First full-attention layers that keep every token (paper code: 2).
    placement : str
        ``"device"`` (as published: all KV on the device, memory not saved), ``"host"`` (default: pages
        in host memory, fetched) or ``"disk"``.
    offload_dir : str | None
        Directory of the disk placement (default: a temporary directory).
    """

    name = "quest"
    description = "Quest: per-step top pages by min/max key bounds (placement='device' as published)"

    page: int = 16
    dense_layers: int = 2
    placement: str = "host"
    offload_dir: Any = None

    def validate(self) -> None:
        check_range("page", self.page, 1)
        check_range("dense_layers", self.dense_layers, 0)
        check_choice("placement", self.placement, tuple(PLACEMENTS))
        if self.offload_dir is not None:
            if self.placement != "disk":
                raise ValueError(f"offload_dir is only used with placement='disk' (placement={self.placement!r})")
            check_directory(self.offload_dir)

    @property
    def offload(self) -> str:  # the engine's tier
        return PLACEMENTS[self.placement]

    def bind_model(self, model) -> None:
        self.kv_bytes = next(model.parameters()).element_size()

    def setup(self, cache) -> None:
        super().setup(cache)
        self.layer_windows = list(cache.layer_windows)
        self.plans: dict[tuple[float, int], tuple[list[list[int]], list[str]]] = {}

    # --- budgets -------------------------------------------------------------------------------
    def metadata_tokens(self, prompt_len: int) -> int:
        """Token-equivalent of one head's min/max keys where they are paid (not on the device placement)."""
        return 0 if self.placement == "device" else math.ceil(prompt_len / self.page)

    def plan(self, keep: float, prompt_len: int) -> tuple[list[list[int]], list[str]]:
        """``(budgets [L][H], role per layer)``: ``"dense"``, ``"pages"``, ``"static"`` (short prompts) or
        ``"sliding"``."""
        key = (keep, prompt_len)
        if key not in self.plans:
            self.plans[key] = self._plan(keep, prompt_len)
        return self.plans[key]

    def _plan(self, keep: float, prompt_len: int) -> tuple[list[list[int]], list[str]]:
        windows, heads = self.layer_windows, self.n_kv_heads
        n_layers = len(windows)
        total = total_budget(keep, prompt_len, n_layers, heads)
        full = [layer for layer, window in enumerate(windows) if window is None]
        sliding = [layer for layer, window in enumerate(windows) if window is not None]
        share = total // (n_layers * heads)  # sliding heads: the uniform share (the cache caps it)
        rest = total - share * len(sliding) * heads
        for dense_count in (min(self.dense_layers, len(full)), 0):
            if keep >= 1.0:
                break
            dense, sparse = full[:dense_count], full[dense_count:]
            left = rest - len(dense) * heads * prompt_len
            if not sparse or left < 0:
                continue
            per_head = split_evenly(left, len(sparse) * heads)
            if min(per_head) - self.metadata_tokens(prompt_len) >= 2 * self.page:
                roles = ["sliding" if window is not None else "dense" if layer in dense else "pages"
                         for layer, window in enumerate(windows)]
                return self._budgets(roles, prompt_len, share, per_head), roles
        roles = ["sliding" if w is not None else "static" for w in windows]
        return self._budgets(roles, prompt_len, share, split_evenly(rest, len(full) * heads) if full else []), roles

    def _budgets(self, roles: list[str], prompt_len: int, share: int, per_head: list[int]) -> list[list[int]]:
        heads, spread = self.n_kv_heads, iter(per_head)
        budgets = []
        for role in roles:
            if role == "dense":
                budgets.append([prompt_len] * heads)
            elif role == "sliding":
                budgets.append([share] * heads)
            else:
                budgets.append([next(spread) for _ in range(heads)])
        return budgets

    def budgets(self, keep: float, prompt_len: int, n_layers: int, n_kv_heads: int) -> list[list[int]]:
        return self.plan(keep, prompt_len)[0]

    # --- prefill -------------------------------------------------------------------------------
    def select(self, ctx: PrefillContext) -> torch.Tensor:
        if ctx.keeps_everything():
            return ctx.keep_all()
        roles = [self.plan(ctx.keep, n)[1][ctx.layer_idx] for n in ctx.prompt_lengths.tolist()]
        keep = torch.zeros_like(ctx.keep_all())
        last = window_attention(ctx.queries, ctx.keys, 1, ctx.scaling, ctx.valid)[:, :, 0]  # (B, Hq, T)
        scores = last.view(ctx.keys.shape[0], ctx.n_kv_heads, ctx.group, -1).amax(2)  # first pages only
        paged = [row for row, role in enumerate(roles) if role == "pages"]
        for row, role in enumerate(roles):
            if role == "dense":
                keep[row] = ctx.keep_all()[row]
            elif role in ("static", "sliding"):
                sinks = SINKS if role == "static" else 0
                keep[row] = select_with_forced(scores[row:row + 1], ctx.valid[row:row + 1], ctx.budget[row:row + 1],
                                               sinks, ctx.budget[row:row + 1])[0]
        if paged:
            keep[paged] = self._page(ctx, paged, scores)
        return keep

    def _page(self, ctx: PrefillContext, rows: list[int], scores: torch.Tensor) -> torch.Tensor:
        """Page every valid token of the retrieving ``rows`` into the engine; the first pages by the last
        prompt query's attention. Returns their kept tokens ``(len(rows), Hkv, T)``."""
        b, n_kv, length, d = ctx.keys.shape
        meta = torch.tensor([self.metadata_tokens(int(ctx.prompt_lengths[row])) for row in rows],
                            device=ctx.budget.device)
        units = ((ctx.budget[rows] - meta[:, None]) // self.page).reshape(-1)
        seq = [row * n_kv + h for row in rows for h in range(n_kv)]
        valid = ctx.valid[rows][:, None, :].expand(-1, n_kv, -1).reshape(-1, length)
        slots, extra, paged_keys = self.engine.page(
            ctx.layer_idx, ctx.keys[rows].reshape(-1, length, d), ctx.values[rows].reshape(-1, length, d), valid,
            scores[rows].reshape(-1, length), units, self.page, seq, seq == list(range(b * n_kv)), ctx.group,
            ctx.scaling)
        slots.index = page_bounds(paged_keys, self.page)
        return (slots.held_tokens() | extra).view(len(rows), n_kv, length)

    # --- decode --------------------------------------------------------------------------------
    def wanted(self, layer, slots: PagedSlots, queries: torch.Tensor) -> torch.Tensor:
        scores = slots.index.page_scores(grouped_queries(queries, layer.n_kv_heads, slots), slots.base)
        return choose_units(slots, scores)
