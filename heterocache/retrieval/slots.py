"""The device side of a retrieving layer: which prompt pages sit in each sequence's dynamic slots.

A *sequence* is one (batch row, KV head) of a layer (cache sequence id ``b * Hkv + h``). At prefill
its selectable prompt tokens are cut, in position order, into pages (*units*) of ``unit`` tokens
(:func:`page_layout`); the slow tier keeps them in that layout and a page moves as one block. Each
sequence holds ``counts[i]`` pages at a time in its dynamic slots; which ones is a policy's choice
(an index scored by the step's queries, or another layer's choice), the moving is the engine's
(``retrieval/engine.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PagedSlots:
    """Dynamic-slot state of one layer: ``n`` sequences, ``P`` pages each.

    ``index`` is the policy's device-resident selection structure (``retrieval/index.py``), or None
    when the selection comes from elsewhere (OmniKV's filter layers).
    """

    seq: list[int]  # cache sequence ids b * Hkv + h
    resident: torch.Tensor  # (n, P) bool: the pages now in the dynamic slots
    counts: torch.Tensor  # (n,) pages held per sequence
    width: int  # max(counts)
    base: torch.Tensor  # (n, P) fp32 added to the page scores: 0, or -inf on padding / retired pages
    length: int  # prompt length T
    page_positions: torch.Tensor  # (n, P, unit) prompt position of every page token (``page_layout``)
    unit: int = 1  # prompt tokens per page
    group: int = 1  # query heads per KV head
    scaling: float = 1.0  # the attention's scaling
    index: Any = None  # the policy's index (scores pages from queries), or None
    slot_of: torch.Tensor | None = None  # (n, T) storage slot holding each resident prompt position
    seq_ids: torch.Tensor | None = None  # ``seq`` as a tensor
    version: int = -1  # the layer storage version ``slot_of`` was computed for
    every_row: bool = False  # ``seq`` is every sequence of the layer in order (no query gather)
    uniform: bool = True  # every sequence has ``width`` pages
    blocks: bool = False  # unit slot k of a sequence = storage slots [k * unit, (k + 1) * unit)
    current: torch.Tensor | None = None  # blocks / row layout: (n, width) the page in each unit slot
    anchors: torch.Tensor | None = None  # drift gate: (n, group, C) fp32 projected queries of each last refill
    anchored: torch.Tensor | None = None  # (n,) bool: ``anchors`` holds one
    native: Any = field(default=None, repr=False)  # the fused C refill's state (``retrieval/native_refill.py``)

    def __post_init__(self) -> None:
        self.uniform = bool((self.counts == self.width).all())

    @property
    def pages(self) -> int:
        return self.resident.shape[1]

    def held_tokens(self) -> torch.Tensor:
        """``(n, T)`` bool: the prompt tokens in the dynamic slots."""
        n = self.resident.shape[0]
        held = torch.zeros(n, self.length, dtype=torch.bool, device=self.resident.device)
        pages = self.resident[:, :, None].expand(-1, -1, self.unit)
        rows = torch.arange(n, device=held.device)[:, None, None].expand_as(pages)
        held[rows[pages], self.page_positions[pages]] = True
        return held

    def real_pages(self) -> torch.Tensor:
        """``(n, P)`` bool: pages that hold prompt tokens and may still be chosen."""
        return torch.isfinite(self.base)


def choose_units(slots: PagedSlots, score: torch.Tensor) -> torch.Tensor:
    """Pages ``(n, width)`` for the dynamic slots from ``score (n, P)`` (highest first, in no particular
    order); a row with fewer than ``width`` pages repeats one of its choices."""
    if slots.uniform:
        return score.topk(slots.width, dim=-1, sorted=False).indices
    chosen = score.topk(slots.width, dim=-1).indices
    arange = torch.arange(slots.width, device=chosen.device)[None, :]
    last = chosen.gather(1, (slots.counts - 1).clamp(min=0)[:, None])
    return torch.where(arange < slots.counts[:, None], chosen, last)


def page_layout(selectable: torch.Tensor, scores: torch.Tensor, page: int,
                spare: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each row's selectable positions (``(n, T)`` bool) into pages of ``page`` consecutive ones.

    A row's remainder (its count modulo ``page``) is not paged: its highest-``scores`` selectable
    tokens are returned in ``extra`` (to be kept statically) where ``spare (n,)`` allows it, else its
    lowest-scored ones are left out. Returns ``positions (n, P, page)`` long (0 on padding pages),
    ``real (n, P)`` bool and ``extra (n, T)`` bool.
    """
    rows = []
    extra = torch.zeros_like(selectable)
    for i in range(selectable.shape[0]):
        positions = torch.nonzero(selectable[i]).flatten()
        left = positions.numel() % page
        if left:
            order = scores[i, positions].argsort(descending=True, stable=True)
            if spare is None or bool(spare[i]):  # the best ones are kept, the rest paged
                extra[i, positions[order[:left]]] = True
                positions = positions[order[left:].sort().values]
            else:
                positions = positions[order[: positions.numel() - left].sort().values]
        rows.append(positions.view(-1, page))
    pages = max(1, max(r.shape[0] for r in rows))
    out = torch.zeros(len(rows), pages, page, dtype=torch.long, device=selectable.device)
    real = torch.zeros(len(rows), pages, dtype=torch.bool, device=selectable.device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        real[i, : r.shape[0]] = True
    return out, real, extra


def to_blocks(summaries: torch.Tensor, group: int, block: int) -> torch.Tensor:
    """Index ``(n, C, G * P)`` (column ``g * P + p``: token g of page p; pages index: G = 1) -> the native
    refill's layout, ``(n, C * G * P)``: per sequence each run of ``block`` pages as ``(G, C, block)``,
    the last (shorter) run likewise, so each block of pages is one contiguous run of memory."""
    n, channels, length = summaries.shape
    pages = length // group
    whole = pages // block * block
    columns = summaries.view(n, channels, group, pages)
    runs = columns[..., :whole].reshape(n, channels, group, whole // block, block).permute(0, 3, 2, 1, 4)
    last = columns[..., whole:].permute(0, 2, 1, 3)
    return torch.cat([runs.reshape(n, -1), last.reshape(n, -1)], dim=1)


def from_blocks(blocks: torch.Tensor, channels: int, group: int, block: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: ``(n, C, G * P)``."""
    n = blocks.shape[0]
    pages = blocks.shape[1] // (channels * group)
    whole = pages // block * block
    runs = blocks[:, : whole * channels * group].view(n, whole // block, group, channels, block)
    last = blocks[:, whole * channels * group:].view(n, group, channels, pages - whole)
    columns = torch.cat([runs.permute(0, 3, 2, 1, 4).reshape(n, channels, group, whole), last.permute(0, 2, 1, 3)],
                        dim=-1)
    return columns.reshape(n, channels, group * pages)
