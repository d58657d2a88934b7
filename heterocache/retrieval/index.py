"""HeteroCache's device-resident page index: what a step's queries are scored against.

``SummaryIndex`` is one of two summaries of every paged key, stored in ``summary_dtype`` (int8: each
channel rounded to 255 levels of its own fp32 scale, which multiplies the queries instead):

- ``kind="sketch"``: every paged key projected on its head's top-``rank`` right singular vectors
  (Loki-style), ``summaries (n, r, unit * P)`` with column ``g * P + p`` = token g of page p; a page
  scores as the log-sum-exp (``page_lse``) or the max of its tokens' sketched logits;
- ``kind="pages"``: the mean key of every page, ``summaries (n, D, P)``.

A page's score for a sequence: the index's estimate of ``scaling * q . k`` per query row, plus the
page's base (-inf on padding / retired pages), shifted per row by its maximum, max over the group's
rows. The fused C refill scores the same index (``retrieval/native_refill.py``), in its block layout
(``summary_block > 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from heterocache.retrieval.slots import from_blocks


@dataclass
class SummaryIndex:
    kind: str  # "sketch" or "pages"
    summaries: torch.Tensor  # sketch (n, r, unit * P) / pages (n, D, P); or (n, C * G * P) in the block layout
    basis: torch.Tensor | None  # sketch: (n, D, r) fp32 top right singular vectors x scaling
    channel_scale: torch.Tensor | None  # int8 summaries: (n, 1, C) fp32 per-channel scale
    scaling: float  # the attention's scaling (page means multiply the queries by it)
    unit: int  # tokens per page
    page_lse: bool = True  # sketch: page score = log-sum-exp of its tokens' scores (else their max)
    channels: int = 0  # C: sketch rank, or head_dim for page means
    summary_block: int = 0  # > 0: ``summaries`` are in the native refill's block layout of that many pages

    @property
    def group(self) -> int:
        """Columns per page in the summaries: tokens for the sketch, 1 for page means."""
        return self.unit if self.kind == "sketch" else 1

    def columns(self) -> torch.Tensor:
        """The summaries in column layout (back from the native block layout if needed)."""
        if self.summary_block:
            return from_blocks(self.summaries, self.channels, self.group, self.summary_block)
        return self.summaries

    def project(self, queries: torch.Tensor) -> torch.Tensor:
        """``queries (n, R, D)`` in the index's channels, ``(n, R, C)`` fp32: on the sketch basis (which
        carries ``scaling``), or ``scaling * q`` for page means; times the int8 channel scale. What the
        index is scored with, and what the drift gate (``refresh_drift``) compares."""
        if self.basis is not None:
            projected = torch.bmm(queries.float(), self.basis)
        else:
            projected = queries.float() * self.scaling
        if self.channel_scale is not None:
            projected = projected * self.channel_scale
        return projected

    def page_scores(self, queries: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``(n, P)`` scores of the pages for ``queries (n, R, D)`` (R = group x q), ``base (n, P)`` added
        before the per-row shift."""
        # fp32 compute: a bf16 bmm on CPU costs more than widening the stored index each step
        summaries = self.columns()
        if self.basis is not None:  # per-token sketch; a page scores as the lse (or max) of its tokens
            bound = torch.bmm(self.project(queries), summaries.float())  # (n, R, unit * P)
            if self.unit > 1:
                tokens = bound.view(*bound.shape[:2], self.unit, -1)
                bound = tokens.logsumexp(2) if self.page_lse else tokens.amax(2)
            bound = bound + base[:, None]
        else:
            q = queries.float() if self.channel_scale is None else queries.float() * self.channel_scale
            bound = torch.baddbmm(base[:, None], q, summaries.float(), alpha=self.scaling)  # (n, R, P)
        bound = bound - bound.amax(-1, keepdim=True).clamp(min=-1e30)
        return bound.amax(1)

    def select_rows(self, src: torch.Tensor) -> None:
        """Keep rows ``src (n',)`` in that order (beam search's reorder)."""
        for name in ("summaries", "basis", "channel_scale"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, src).contiguous())

    def nbytes(self) -> int:
        """Device bytes: the summaries, the sketch basis and the int8 channel scales."""
        return sum(t.numel() * t.element_size() for t in (self.summaries, self.basis, self.channel_scale)
                   if t is not None)


def quantize(summary: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``summary (n, U, C)`` fp32 -> stored ``(n, C, U)`` in ``dtype`` and, for int8, the per-channel
    scale ``(n, 1, C)`` (channel maximum / 127; values rounded to the nearest step) that the queries
    are multiplied by instead."""
    scale = None
    if dtype == torch.int8:
        scale = summary.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        summary = (summary / scale).round().clamp(-127, 127)
    return summary.to(dtype).transpose(1, 2).contiguous(), scale


def page_means(keys: torch.Tensor, selectable: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys (n, T, D)``, ``selectable (n, T)`` -> mean selectable key per page ``(n, P, D)`` fp32 and
    ``has (n, P)``: the page holds a selectable token."""
    n, length, d = keys.shape
    pages = math.ceil(length / page)
    pad = pages * page - length
    k = torch.nn.functional.pad(keys.float(), (0, 0, 0, pad)).view(n, pages, page, d)
    free = torch.nn.functional.pad(selectable, (0, pad), value=False).view(n, pages, page)
    count = free.sum(-1, keepdim=True)
    return (k * free[..., None]).sum(2) / count.clamp(min=1), count[..., 0] > 0


def key_sketch(keys: torch.Tensor, valid: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys (n, T, D)``, ``valid (n, T)`` -> ``(sketch (n, T, r), basis (n, D, r))`` fp32: the keys on
    their top-``rank`` right singular vectors (computed from the valid keys)."""
    masked = keys.float() * valid[..., None]
    basis = torch.linalg.svd(masked, full_matrices=False).Vh[:, :rank].transpose(-1, -2).contiguous()
    return keys.float() @ basis, basis


def build_index(kind: str, paged_keys: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, real: torch.Tensor,
                unit: int, rank: int, dtype: torch.dtype, scaling: float, page_lse: bool) -> SummaryIndex:
    """The index of ``paged_keys (n, P * unit, D)`` (page layout), from the head's ``keys (n, T, D)`` /
    ``valid (n, T)`` (the sketch basis) and ``real (n, P)`` (pages that hold tokens)."""
    n, length, d = paged_keys.shape
    pages = length // unit
    basis = None
    if kind == "sketch":  # every paged key on the head's top singular vectors
        _, basis = key_sketch(keys, valid, rank)
        projected = (paged_keys.float() @ basis).view(n, pages, unit, -1).transpose(1, 2)
        summaries, scale = quantize(projected.reshape(n, unit * pages, -1), dtype)
        basis = basis * scaling  # one multiply less per step
    else:
        means, _ = page_means(paged_keys, real.repeat_interleave(unit, dim=1), unit)
        summaries, scale = quantize(means, dtype)
    return SummaryIndex(kind, summaries, basis, scale, scaling, unit, page_lse, channels=summaries.shape[1])


def summary_tokens(prompt_len: int, page: int, summary_bytes: int, kv_bytes: int) -> float:
    """Device cost of one head's page summaries in kept-token units (a token = a key and a value);
    int8 summaries add their fp32 per-channel scale."""
    scale = 4 if summary_bytes == 1 else 0
    return (math.ceil(prompt_len / page) * summary_bytes + scale) / (2 * kv_bytes)


def sketch_tokens(prompt_len: int, rank: int, head_dim: int, summary_bytes: int, kv_bytes: int) -> float:
    """Device cost of one head's rank-``rank`` sketch (``T x r`` in the summary dtype + an fp32 ``D x r``
    basis) in kept-token units."""
    scale = rank * 4 if summary_bytes == 1 else 0  # int8: fp32 per-channel scale
    return (prompt_len * rank * summary_bytes + head_dim * rank * 4 + scale) / (2 * head_dim * kv_bytes)
