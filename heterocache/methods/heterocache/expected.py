"""Query-agnostic prefill scores: the expected attention of future queries (per KV head).

The question may come after compression, so the static part of a compressed head cannot rely on
the prompt's last queries voting for it (SnapKV). Instead, estimate the distribution of FUTURE
queries of each query head from the prompt's last ``window`` queries: undo RoPE (pre-RoPE queries
``q~ ~ N(mu, Sigma)``), rotate by the RoPE rotation averaged over the next ``future`` positions
(``Rbar``), and score each post-RoPE key ``k`` by the expected softmax numerator

    log E[exp(s q.k)] = s (Rbar mu).k + s^2 k^T (Rbar Sigma Rbar^T) k / 2,   s = attention scaling,

normalised per query head over the valid keys, averaged over the GQA group, optionally times the
value norm ``||v||`` (a key that is attended but carries a small value moves the output little).
Formula after the expected-attention idea (Devoto et al., kvpress); written for this repository.
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unrotate(queries: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Undo HF rotate-half RoPE: ``queries (B, H, w, D)`` at ``positions (B, w)`` -> pre-RoPE queries."""
    angles = positions.double()[..., None] * inv_freq.double()  # (B, w, D/2)
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1).float()[:, None]
    sin = torch.cat((angles.sin(), angles.sin()), dim=-1).float()[:, None]
    return queries * cos - _rotate_half(queries) * sin  # R(-t) is the transpose of R(t)


def mean_rotation(starts: torch.Tensor, future: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """``Rbar (B, D, D)``: the RoPE rotation averaged over positions ``start .. start + future - 1`` per row."""
    offsets = torch.arange(max(1, future), dtype=torch.float64, device=inv_freq.device)
    angles = (starts.double()[:, None, None] + offsets[None, :, None]) * inv_freq.double()  # (B, F, D/2)
    c, s = angles.cos().mean(1), angles.sin().mean(1)  # (B, D/2)
    half = c.shape[-1]
    rot = torch.zeros(starts.shape[0], 2 * half, 2 * half, dtype=torch.float64, device=inv_freq.device)
    idx = torch.arange(half, device=inv_freq.device)
    # x' = x cos + rotate_half(x) sin with rotate_half([x1, x2]) = [-x2, x1]
    rot[:, idx, idx] = c
    rot[:, idx + half, idx + half] = c
    rot[:, idx, idx + half] = -s
    rot[:, idx + half, idx] = s
    return rot.float()


def expected_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                       scaling: float, inv_freq: torch.Tensor, window: int = 64, future: int = 512,
                       covariance: bool = True, value_norm: bool = True) -> torch.Tensor:
    """Expected attention per KV head ``(B, Hkv, T)`` (before the value norm each query head's row sums to 1).

    ``queries (B, Hq, T, D)`` post-RoPE, ``keys``/``values (B, Hkv, T, D)``, ``valid (B, T)`` with left
    padding only (row ``b``'s token at slot ``t`` has RoPE position ``t - pad_b``).
    """
    b, hq, length, d = queries.shape
    hkv = keys.shape[1]
    group = hq // hkv
    w = min(window, length)
    inv_freq = inv_freq.to(queries.device)
    pad = length - valid.sum(-1)  # (B,)
    slots = torch.arange(length - w, length, device=queries.device)
    positions = slots[None, :] - pad[:, None]  # (B, w)
    pre = unrotate(queries[:, :, length - w:].float(), positions, inv_freq)  # (B, Hq, w, D)
    mu = pre.mean(dim=2)  # (B, Hq, D)
    rot = mean_rotation(length - pad, future, inv_freq)  # (B, D, D)
    mu_future = torch.einsum("bij,bhj->bhi", rot, mu)
    k = keys.float().repeat_interleave(group, dim=1)  # (B, Hq, T, D)
    logits = scaling * torch.einsum("bhtd,bhd->bht", k, mu_future)
    if covariance and w > 1:
        centred = pre - mu[:, :, None]
        sigma = centred.transpose(-1, -2) @ centred / (w - 1)  # (B, Hq, D, D)
        sigma_future = rot[:, None] @ sigma @ rot.transpose(-1, -2)[:, None]
        logits = logits + 0.5 * scaling * scaling * torch.einsum("bhtd,bhde,bhte->bht", k, sigma_future, k)
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    scores = probs.view(b, hkv, group, length).mean(dim=2)
    if value_norm:
        scores = scores * values.float().norm(dim=-1)
    return scores


def rope_inv_freq(model) -> torch.Tensor | None:
    """The global RoPE inverse frequencies ``(D/2,)`` of a transformers decoder, or None without RoPE."""
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    rotary = getattr(inner, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    return None if inv_freq is None else inv_freq.detach().float().cpu()
