"""ShadowKV's device-resident index: chunk landmarks to score, low-rank pre-RoPE keys to rebuild.

Per retrieving layer and batch row the device keeps ``U_r (T, r)`` (shared by the row's KV heads)
and per KV head ``(S_r V_r^T)_h (r, D)``, the truncated SVD of the row's pre-RoPE keys
``(T, Hkv * D)``; per sequence (batch row x KV head) the landmark of every paged chunk (its mean
post-RoPE key). A step scores chunks against the landmarks; the engine fetches the chosen chunks'
values from the slow tier and asks :meth:`LowRankIndex.rebuild_keys` for their keys
(``U_r[positions] (S V^T)_h``, rotated to the tokens' rotary positions), so keys never cross the
tier boundary.

RoPE (transformers' ``rotate_half`` convention, ``cos = cat(freqs, freqs)``, the first
``2 * len(inv_freq)`` channels rotated): the keys are un-rotated and re-rotated with the same
unscaled ``cos``/``sin``, so a RoPE ``attention_scaling`` factor stays in the factors and cancels,
and a per-row constant offset of the positions (a rotation of every key of the row alike) keeps
the matrix's rank: the rebuild is exact at full rank whatever the offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor | None, inverse: bool = False) -> torch.Tensor:
    """RoPE ``x (..., T, D)`` at ``positions (..., T)`` (fp32 out); ``inverse``: undo it. No RoPE
    (``inv_freq`` None): ``x`` unchanged. Angles as transformers computes them: fp32 ``p * inv_freq``."""
    x = x.float()
    if inv_freq is None:
        return x
    half = inv_freq.numel()
    angles = positions[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
    cos, sin = angles.cos(), angles.sin()
    if inverse:
        sin = -sin
    first, second, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin, rest], dim=-1)


def rotary_inv_freq(model) -> torch.Tensor | None:
    """RoPE inverse frequencies of the full-attention layers (``rotary_emb.inv_freq``, Gemma-3's
    ``full_attention_inv_freq``), or None without RoPE."""
    inner = getattr(model, "model", model)
    rotary = getattr(getattr(inner, "language_model", inner), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", getattr(rotary, "full_attention_inv_freq", None))
    return None if inv_freq is None else inv_freq.detach().float()


def low_rank_factors(pre_keys: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of one row's pre-RoPE keys ``(Hkv, T, D)``: ``U_r (T, r)`` and ``(S_r V_r^T)`` per
    head ``(Hkv, r, D)``, fp32, with ``U_r (S V^T)_h`` the rank-``r`` approximation of head ``h``."""
    heads, length, d = pre_keys.shape
    matrix = pre_keys.float().permute(1, 0, 2).reshape(length, heads * d)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = min(rank, s.numel())
    sv = (s[:rank, None] * vh[:rank]).view(rank, heads, d).permute(1, 0, 2)
    return u[:, :rank].contiguous(), sv.contiguous()


def min_cosine(keys: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys (H, C * chunk, D)`` cut into ``C`` chunks -> ``(means (H, C, D), min_cos (H, C))`` fp32: each
    chunk's mean key and the lowest cosine similarity between it and its member keys (outlier rule)."""
    heads, length, d = keys.shape
    members = keys.float().view(heads, length // chunk, chunk, d)
    means = members.mean(2)
    cos = torch.nn.functional.cosine_similarity(members, means[:, :, None], dim=-1, eps=1e-12)
    return means, cos.amin(-1)


@dataclass
class LowRankIndex:
    """One layer's index over ``n`` sequences with ``P`` pages (chunks) each.

    ``landmarks (n, P, D)`` mean post-RoPE key per page (cache dtype); ``u (N, r)`` the rows' ``U_r``
    concatenated (cache dtype), sequence ``i`` reading rows ``u_start[i] + rotary position`` (of
    length ``u_len[i]``); ``sv (n, r, D)`` its head's ``S_r V_r^T`` slice; ``first (n,)`` the storage
    slot of its row's rotary position 0; ``slots``: the layer's :class:`PagedSlots` (page positions).
    """

    landmarks: torch.Tensor
    u: torch.Tensor
    u_start: torch.Tensor
    u_len: torch.Tensor
    sv: torch.Tensor
    first: torch.Tensor
    inv_freq: torch.Tensor | None
    scaling: float
    group: int
    slots: Any = None

    def page_scores(self, queries: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``(n, P)``: per query row of ``queries (n, G * q, D)`` a softmax over pages of
        ``scaling * q . landmark`` (+ ``base``: -inf on padding / retired pages), summed over the q
        positions, max over the group's G heads; ``base`` added again so excluded pages stay -inf."""
        logits = torch.baddbmm(base[:, None], queries.float(), self.landmarks.float().transpose(1, 2), alpha=self.scaling)
        probs = torch.softmax(logits, dim=-1).nan_to_num_(nan=0.0)  # a row whose pages were all retired (crop)
        n, rows, pages = probs.shape
        return probs.view(n, self.group, rows // self.group, pages).sum(2).amax(1) + base

    def rebuild_keys(self, rows: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys ``(m, unit, D)`` fp32 of pages ``units (m,)`` of sequences ``rows (m,)``."""
        positions = self.slots.page_positions[rows, units]  # (m, unit) storage slots
        rotary = positions - self.first[rows, None]
        factors = self.u[self.u_start[rows, None] + rotary]  # (m, unit, r)
        return rotate(torch.bmm(factors.float(), self.sv[rows].float()), rotary, self.inv_freq)

    def select_rows(self, src: torch.Tensor) -> None:
        """Keep sequences ``src (n',)`` in that order (beam search): each referenced row's ``U_r`` block is
        kept once (sequences of one row, or of duplicated rows, share it), the rest freed."""
        if src.numel() == 0:
            return
        self.landmarks, self.sv, self.first = (t.index_select(0, src).contiguous() for t in (self.landmarks, self.sv, self.first))
        starts, lengths = self.u_start[src], self.u_len[src]
        unique, inverse = torch.unique(starts, return_inverse=True)
        block_len = torch.zeros_like(unique).scatter_(0, inverse, lengths)
        new_start = torch.cumsum(block_len, 0) - block_len
        self.u = torch.cat([self.u[int(s):int(s) + int(n)] for s, n in zip(unique.tolist(), block_len.tolist())])
        self.u_start, self.u_len = new_start[inverse], lengths

    def nbytes(self) -> int:
        """Device bytes of the landmarks and factors (the per-sequence offsets are slot bookkeeping, like
        the engine's page positions, and not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.landmarks, self.u, self.sv))
