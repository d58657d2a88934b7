"""OmniKV (Hao et al., ICLR 2025): a few filter layers choose the context of the layers after them,
every decode step (spec/baselines.md s.9).

Within one decode step the important tokens of successive layers overlap strongly. A *filter* layer
keeps its whole prompt on the device and scores it with the step's own query (post-RoPE; selector
``"last"``: ``score_j = max over its query heads (and the step's positions) of scaling * q_h . k_j``);
its top-``k`` prompt positions, one set per batch row shared by all KV heads, are what every *sparse*
layer up to the next filter layer attends to this step, plus every generated token. Sparse layers keep
their whole prompt in the slow tier (the retrieval engine's pages of one token, nothing static) and
``k`` token slots per KV head on the device; only the chosen tokens that are not resident are fetched.

Roles (all layers keep every decode token):

- ``dense``: the full-attention layers before the first filter layer, every filter layer and the
  ``wait_layers`` (1) full-attention layers after each filter layer (published: they hide the host
  transfer of the next sparse layer's rows behind their own compute); every prompt token on the device;
- ``sparse``: the other full-attention layers, fed by the closest filter layer before them;
- ``sliding`` (sliding-window layers): their most recent tokens, never retrieved.

Budget (docs/DESIGN.md s.2: ``keep`` counts every device byte): dense heads hold ``T``, sliding heads
the uniform share (at most the ``min(T, W - 1)`` tokens they can use), the sparse heads share the rest
equally (layer-major remainder, so at most one layer has heads of ``k`` and ``k + 1``; a head with
``c`` slots takes the first ``c`` of the filter's ranking, so a row's sets are nested). The published
layout does not fit small budgets on small models (SmolLM2, 30 layers: 2 + 3 + 3 dense layers are 27%
of the KV, more than keep 0.25), so where the sparse heads would get fewer than ``min_k`` tokens the
layout is shed in this order until it fits: (1) the wait layers become sparse (they only hide a
transfer, which this implementation does not overlap); (2) the dense layers before the first filter
become static: SnapKV window votes over their own prompt (window 32, max-pool 7, group mean), each
head paid like a sparse head; (3) filter layers are dropped from the latest down to one (a dropped one
becomes sparse, fed by the filter before it). A prompt that cannot pay even one filter layer is
served statically everywhere: 4 sinks + the most recent tokens per head (as Quest's fallback).
``stats()`` reports the resolved roles of the longest prompt of the batch (``omnikv_*``).

Bytes: ``device_bytes`` are the layers' storage (dense layers whole, sparse layers their ``k`` slots,
every decode token) plus the filter layers' rankings; ``host_bytes`` (``disk_bytes``, or device bytes
with ``offload="none"``) the sparse layers' prompt K/V in the tier (rows padded to the batch's longest
prompt); ``retrieval_bytes`` the K/V rows fetched because they were chosen and not resident. Nothing
is evicted during decode.

Every fetch of a sparse layer is known at its filter layer, one or more layers before it is needed
(the property an asynchronous prefetch would use; bookkeeping only here): ``omnikv_lead_layers`` sums
``layer - filter`` over every (sparse layer, step) selection, ``omnikv_selections`` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from heterocache.methods.base import PrefillContext, check_choice, check_range
from heterocache.methods.omnikv.plan import Plan, default_filter_layers, resolve_plan
from heterocache.methods.scoring import select_with_forced
from heterocache.methods.snapkv import window_votes
from heterocache.retrieval.policy import RetrievingMethod
from heterocache.retrieval.slots import PagedSlots
from heterocache.retrieval.tiers import TIERS, check_directory

SINKS = 4  # static fallback of short prompts
SNAP_WINDOW, SNAP_KERNEL = 32, 7  # static layers before the first filter: SnapKV's votes
SELECTORS = ("last", "softmax_before_last")


@dataclass
class OmniKV(RetrievingMethod):
    """OmniKV: filter layers choose every step the prompt tokens of the sparse layers after them.

    Published defaults (Llama-3-8B, 32 layers): filter layers ``{2, 8, 18}``, dense layers ``0, 1``,
    every filter layer and one wait layer after each; sparse layers attend to ``k = 0.067 * T`` prompt
    tokens chosen by the closest filter layer's last query (selector ``"last"``, max over heads of the
    raw logits), their full KV in host memory. Deviations (see the module for the rules):

    - ``k`` follows from ``keep`` (every device byte counted, docs/DESIGN.md s.2): dense heads hold the
      whole prompt, sparse heads share the rest; where that leaves them fewer than ``min_k`` tokens
      the layout is shed (wait layers, then the dense layers before the first filter become SnapKV-
      static, then filter layers from the latest), and short prompts are served statically (sinks +
      recent);
    - filter layers of an unknown model are the depth fractions ``{1/16, 1/4, 9/16}`` of its
      full-attention layers, rounded (30 layers: ``{2, 8, 17}``; 24: ``{2, 6, 14}``); the published
      ones were chosen offline for Llama-3-8B;
    - wait layers stay dense as published, but nothing is prefetched behind them (the lead of each
      fetch is only counted, ``omnikv_lead_layers``);
    - each sparse head holds ``k`` or ``k + 1`` (the budget's remainder) of one nested ranking per
      row; before the first decode step a sparse layer holds its filter's choice for the prompt's
      last query; sliding-window layers keep their most recent tokens.

    Parameters
    ----------
    filter_layers : list[int] | str | None
        Filter layer indices (full-attention layers; a list, an int or ``"2,8,18"``). None (default):
        by depth fraction, see above.
    wait_layers : int
        Dense layers after each filter layer (paper: 1).
    selector : str
        ``"last"`` (paper default: max over heads of the logits) or ``"softmax_before_last"`` (each
        head's logits softmaxed over the prompt first).
    min_k : float
        Fewest prompt tokens a sparse head must get before the layout is shed: below 1 a fraction of
        the prompt (at least 2 tokens), else a count (default 0.02).
    offload : str
        Where the sparse layers' prompt lives: ``"host"`` (default, the paper's memory runs), ``"disk"``
        or ``"none"`` (on the device, counted as device bytes: the paper's accuracy runs).
    offload_dir : str | None
        Directory of the disk tier (default: a temporary directory).
    """

    name = "omnikv"
    description = "OmniKV: filter layers' top-k tokens feed the sparse layers after them, every step"

    filter_layers: Any = None
    wait_layers: int = 1
    selector: str = "last"
    min_k: float = 0.02
    offload: str = "host"
    offload_dir: Any = None

    def validate(self) -> None:
        self.filters_option()
        check_range("wait_layers", self.wait_layers, 0)
        check_choice("selector", self.selector, SELECTORS)
        check_range("min_k", self.min_k, 0, low_open=True)
        check_choice("offload", self.offload, TIERS)
        if self.offload_dir is not None:
            if self.offload != "disk":
                raise ValueError(f"offload_dir is only used with offload='disk' (offload={self.offload!r})")
            check_directory(self.offload_dir)

    def filters_option(self) -> list[int] | None:
        """``filter_layers`` as a sorted list of ints (None: the default)."""
        value = self.filter_layers
        if value is None:
            return None
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            if not all(p.lstrip("-").isdigit() for p in parts):
                raise ValueError(f"filter_layers={value!r} must be layer indices such as '2,8,18'")
            value = [int(p) for p in parts]
        elif isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
            raise ValueError(f"filter_layers={self.filter_layers!r} must be a non-empty list of layer indices >= 0")
        return sorted(set(value))

    def setup(self, cache) -> None:
        super().setup(cache)
        self.layer_windows = list(cache.layer_windows)
        full = [layer for layer, window in enumerate(self.layer_windows) if window is None]
        chosen = self.filters_option()
        if chosen is None:
            chosen = [full[i] for i in default_filter_layers(len(full))] if full else []
        bad = [f for f in chosen if f >= len(self.layer_windows) or self.layer_windows[f] is not None]
        if bad:
            raise ValueError(f"filter_layers={self.filter_layers!r}: {bad} are not full-attention layers of this "
                             f"model (full-attention layers: {full})")
        self.filters = chosen
        self.plans: dict[tuple[float, int], Plan] = {}
        self.row_plans: list[Plan] = []
        self.active: set[int] = set()  # filter layers of some row: they score every step
        self.dependents: dict[int, list[int]] = {}  # filter layer -> sparse layers it feeds
        self.sources: dict[int, torch.Tensor] = {}  # sparse layer -> (n,) filter layer of each sequence
        self.groups: dict[int, list[tuple[int, torch.Tensor | None]]] = {}  # sparse layer -> (filter, rows)
        self.prefill_scores: dict[int, torch.Tensor] = {}  # filter layer -> (B, T) its last prompt query's
        self.rankings: dict[int, torch.Tensor] = {}  # filter layer -> (B, K) this step's pages, best first
        self.scaling: dict[int, float] = {}
        self.views: dict[int, tuple[int, list[tuple[int, torch.Tensor, int]], int]] = {}
        self.lead_layers = self.selections = 0

    # --- budgets -------------------------------------------------------------------------------
    def plan(self, keep: float, prompt_len: int) -> Plan:
        key = (keep, prompt_len)
        if key not in self.plans:
            self.plans[key] = resolve_plan(self.layer_windows, self.n_kv_heads, keep, prompt_len, self.filters,
                                           self.wait_layers, self.min_k)
        return self.plans[key]

    def budgets(self, keep: float, prompt_len: int, n_layers: int, n_kv_heads: int) -> list[list[int]]:
        return self.plan(keep, prompt_len).budgets

    # --- prefill -------------------------------------------------------------------------------
    def select(self, ctx: PrefillContext) -> torch.Tensor:
        if ctx.keep >= 1.0:
            return ctx.keep_all()
        layer = ctx.layer_idx
        self.row_plans = [self.plan(ctx.keep, n) for n in ctx.prompt_lengths.tolist()]
        roles = [plan.roles[layer] for plan in self.row_plans]
        everything = ctx.keep_all()
        self.scaling[layer] = ctx.scaling
        if "filter" in roles:  # (a filter layer keeps everything, but scores the prompt for the sparse layers)
            self.active.add(layer)
            self.prefill_scores[layer] = self._prefill_scores(ctx)
        if ctx.keeps_everything():
            return everything
        keep = torch.zeros_like(everything)
        snap = [row for row, role in enumerate(roles) if role == "snap"]
        if snap:
            votes = window_votes(ctx, SNAP_WINDOW, SNAP_KERNEL, "max", "mean")
            keep[snap] = select_with_forced(votes[snap], ctx.valid[snap], ctx.budget[snap], 0, SNAP_WINDOW)
        zeros = torch.zeros(ctx.keys.shape[:3], device=ctx.keys.device)
        for row, role in enumerate(roles):
            if role in ("dense", "filter", "wait"):
                keep[row] = everything[row]
            elif role in ("static", "sliding"):  # sinks (static only) + the most recent tokens
                budget = ctx.budget[row:row + 1]
                keep[row] = select_with_forced(zeros[row:row + 1], ctx.valid[row:row + 1], budget,
                                               SINKS if role == "static" else 0, budget)[0]
        sparse = [row for row, role in enumerate(roles) if role == "sparse"]
        if sparse:
            keep[sparse] = self._page(ctx, sparse)
        return keep

    def _prefill_scores(self, ctx: PrefillContext) -> torch.Tensor:
        """``(B, T)`` the filter score of every prompt position for the prompt's last query (the sparse
        layers' slots before the first decode step); -inf on padding."""
        b, n_kv, length, d = ctx.keys.shape
        query = ctx.queries[:, :, -1].reshape(b, n_kv, ctx.group, d).float()
        logits = query @ ctx.keys.float().transpose(-1, -2) * ctx.scaling  # (B, Hkv, G, T)
        return self._reduce(logits.reshape(b, -1, length), ctx.valid[:, None, :]).amax(1)

    def _reduce(self, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-row scores of ``logits (r, R, L)`` over the ``valid`` keys (selector), -inf elsewhere."""
        logits = logits.masked_fill(~valid, float("-inf"))
        if self.selector == "softmax_before_last":
            logits = torch.softmax(logits, dim=-1).nan_to_num_(nan=0.0).masked_fill_(~valid, float("-inf"))
        return logits

    def _page(self, ctx: PrefillContext, rows: list[int]) -> torch.Tensor:
        """Page every valid token of the sparse ``rows`` (one token a page); their first slots hold the
        filter's choice for the prompt's last query. Returns their kept tokens ``(len(rows), Hkv, T)``."""
        b, n_kv, length, d = ctx.keys.shape
        layer = ctx.layer_idx
        source = [self.row_plans[row].source[layer] for row in rows]
        scores = torch.stack([self.prefill_scores[f][row] for f, row in zip(source, rows)])  # (rows, T)
        seq = [row * n_kv + h for row in rows for h in range(n_kv)]
        valid = ctx.valid[rows][:, None, :].expand(-1, n_kv, -1).reshape(-1, length)
        slots, extra, _ = self.engine.page(
            layer, ctx.keys[rows].reshape(-1, length, d), ctx.values[rows].reshape(-1, length, d), valid,
            scores.repeat_interleave(n_kv, dim=0).nan_to_num(neginf=-1e30), ctx.budget[rows].reshape(-1), 1,
            seq, seq == list(range(b * n_kv)), ctx.group, ctx.scaling)
        self._set_sources(layer, torch.tensor(source, device=ctx.keys.device).repeat_interleave(n_kv))
        for f in set(source):
            self.dependents.setdefault(f, [])
            if layer not in self.dependents[f]:
                self.dependents[f].append(layer)
        return (slots.held_tokens() | extra).view(len(rows), n_kv, length)

    def _set_sources(self, layer: int, sources: torch.Tensor) -> None:
        self.sources[layer] = sources
        values = sorted(set(sources.tolist()))
        self.groups[layer] = [(values[0], None)] if len(values) == 1 else \
            [(f, torch.nonzero(sources == f).flatten()) for f in values]

    def after_store(self, layer) -> None:
        super().after_store(layer)
        if layer.layer_idx == len(self.layer_windows) - 1:
            self.prefill_scores.clear()  # every sparse layer has its first slots

    # --- decode --------------------------------------------------------------------------------
    def before_decode_attention(self, layer, queries: torch.Tensor) -> None:
        if layer.layer_idx in self.active:
            self.rankings[layer.layer_idx] = self.rank(layer, queries)
        super().before_decode_attention(layer, queries)

    def _prompt_view(self, layer) -> tuple[list[tuple[int, torch.Tensor, int]], int]:
        """Per bucket of a (dense) filter layer: ``(bucket index, mask (rows, Lp) of its prompt slots, Lp)``
        and the longest prompt. A dense sequence holds its prompt in slots ``[0, n)`` in position order,
        so slot ``j`` is the ``j``-th valid prompt position: page ``j`` of every sparse layer of its row."""
        cached = self.views.get(layer.layer_idx)
        if cached is not None and cached[0] == layer.version:
            return cached[1], cached[2]
        counts = layer.kept_prompt_tokens().reshape(-1)
        view = []
        for index, bucket in enumerate(layer.buckets):
            mine = counts[bucket.seq]
            width = int(mine.max()) if mine.numel() else 0
            view.append((index, torch.arange(width, device=mine.device)[None, :] < mine[:, None], width))
        longest = int(counts.max()) if counts.numel() else 0
        self.views[layer.layer_idx] = (layer.version, view, longest)
        return view, longest

    def rank(self, layer, queries: torch.Tensor) -> torch.Tensor:
        """Filter layer ``layer``'s choice for this step's ``queries (B, Hq, q, D)``: ``(B, K)`` prompt
        pages (= the rank of the position among the row's valid ones), best first, ``K`` the most slots
        a sparse sequence it feeds holds. Score of page ``j``: the max over every query head and position
        of ``scaling * q . k_j`` (selector ``"last"``)."""
        view, longest = self._prompt_view(layer)
        b, hq, q, d = queries.shape
        n_kv = layer.n_kv_heads
        grouped = queries.reshape(b * n_kv, (hq // n_kv) * q, d).float()
        scores = torch.full((b * n_kv, longest), float("-inf"), device=queries.device)
        scaling = self.scaling.get(layer.layer_idx, 1.0)
        for index, mask, width in view:
            if not width:
                continue
            bucket = layer.buckets[index]
            rows = grouped if bucket.is_identity else grouped[bucket.seq]
            logits = torch.bmm(rows, bucket.keys[:, :width].float().transpose(1, 2)) * scaling
            scores[bucket.seq, :width] = self._reduce(logits, mask[:, None, :]).amax(1)
        per_row = scores.view(b, n_kv, longest).amax(1)
        need = max((self.engine.layers[s].width for s in self.dependents.get(layer.layer_idx, [])
                    if s in self.engine.layers), default=0)
        return per_row.topk(min(max(need, 1), longest), dim=-1, sorted=True).indices

    def wanted(self, layer, slots: PagedSlots, queries: torch.Tensor) -> torch.Tensor:
        rows = slots.seq_ids // self.n_kv_heads
        width = slots.width
        groups = self.groups[layer.layer_idx]
        if len(groups) == 1:
            chosen = self.rankings[groups[0][0]][rows, :width]
        else:
            chosen = torch.empty((len(slots.seq), width), dtype=torch.long, device=rows.device)
            for f, members in groups:
                chosen[members] = self.rankings[f][rows[members], :width]
        for f, _ in groups:
            self.lead_layers += layer.layer_idx - f
            self.selections += 1
        if not slots.uniform:  # a sequence with fewer slots takes the first ones, repeating its last
            arange = torch.arange(width, device=chosen.device)[None, :]
            last = chosen.gather(1, (slots.counts - 1).clamp(min=0)[:, None])
            chosen = torch.where(arange < slots.counts[:, None], chosen, last)
        return chosen

    def on_batch_select(self, layer, indices: torch.Tensor) -> None:
        src = self.engine.select_rows(layer, indices)
        if src is not None:
            self._set_sources(layer.layer_idx, self.sources[layer.layer_idx].index_select(0, src))

    # --- accounting ----------------------------------------------------------------------------
    def device_extra_bytes(self) -> int:
        """The filter layers' rankings and prompt-slot masks (a few bytes per prompt token)."""
        tensors = [*self.rankings.values(), *(mask for _, view, _ in self.views.values() for _, mask, _ in view)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        if not self.row_plans:
            return out
        plan = max(self.row_plans, key=lambda p: sum(map(sum, p.budgets)))  # the longest prompt's
        leads = [layer - f for layer, f in enumerate(plan.source) if f is not None]
        out.update({
            "omnikv_mode": "static" if "retrieval" in plan.shed else "retrieval",
            "omnikv_filter_layers": plan.layers("filter"),
            "omnikv_dense_layers": plan.layers("dense", "filter", "wait"),
            "omnikv_wait_layers": plan.layers("wait"),
            "omnikv_static_layers": plan.layers("snap", "static"),
            "omnikv_sparse_layers": plan.layers("sparse"),
            "omnikv_k": plan.k,
            "omnikv_shed": list(plan.shed),
            "omnikv_min_lead": min(leads, default=0),
            "omnikv_lead_layers": self.lead_layers,
            "omnikv_selections": self.selections,
        })
        return out
