"""Shared scorers for the attention-based methods (spec/baselines.md section 0).

Every score is computed in fp32 from the post-RoPE queries and keys the attention used: SDPA and
flash attention never return probabilities, so the window scores (SnapKV, PyramidKV, CAKE) and the
full-row column sums (H2O) are recomputed here. Padding keys (``valid`` False) are masked, and rows
whose keys are all masked give zeros instead of NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: scores materialised at once (elements) before the scorers chunk over heads / query rows
CHUNK_ELEMENTS = 1 << 25
#: average-pooling kernel of the calibration's attention rows (spec/heterocache.md s.2), reused at run time
ROW_POOL_KERNEL = 5


def _grouped(queries: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    # (B, Hq, t, D) -> (B, Hkv, G * t, D): query head h reads KV head h // G
    batch, n_heads, length, dim = queries.shape
    return queries.reshape(batch, n_kv_heads, (n_heads // n_kv_heads) * length, dim)


def _safe_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1).nan_to_num_(nan=0.0)  # rows with every key masked (padding queries)


def window_attention(
    queries: torch.Tensor, keys: torch.Tensor, window: int, scaling: float, valid: torch.Tensor
) -> torch.Tensor:
    """Softmax attention of the last ``w = min(window, T)`` query rows, fp32: ``(B, Hq, w, T)``.

    ``queries (B, Hq, T, D)`` (only the last ``w`` rows are read), ``keys (B, Hkv, T, D)``,
    ``valid (B, T)``. Window query ``i`` (absolute position ``T - w + i``) sees keys ``<= T - w + i``;
    padding keys are masked. Chunked over KV heads when the scores would be large.
    """
    batch, n_heads, length, _ = queries.shape
    n_kv_heads = keys.shape[1]
    window = min(window, length)
    rows = torch.arange(length - window, length, device=keys.device)
    cols = torch.arange(length, device=keys.device)
    allowed = (cols[None, :] <= rows[:, None])[None, None] & valid[:, None, None, :]  # (B, 1, w, T)
    grouped = _grouped(queries[:, :, length - window :], n_kv_heads)
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, batch * (n_heads // n_kv_heads) * window * length))
    out = []
    for start in range(0, n_kv_heads, per_chunk):
        stop = min(start + per_chunk, n_kv_heads)
        logits = grouped[:, start:stop].float() @ keys[:, start:stop].float().transpose(-1, -2) * scaling
        logits = logits.view(batch, stop - start, -1, window, length)  # (B, h, G, w, T)
        logits.masked_fill_(~allowed[:, :, None], float("-inf"))
        out.append(_safe_softmax(logits).reshape(batch, -1, window, length))
    return torch.cat(out, dim=1)


def causal_column_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    valid: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """H2O scores: ``a_h[j] = sum_i A_h[i, j]`` over every query row, causal, fp32: ``(B, Hq, T)``.

    ``queries (B, Hq, T, D)``, ``keys (B, Hkv, T, D)``, ``valid (B, T)``. Row ``i`` sees keys
    ``j <= i`` that are valid; padding query rows contribute nothing. Query rows are processed
    ``chunk`` at a time (default: about ``CHUNK_ELEMENTS`` scores per chunk), each chunk against
    the keys it can see, so no ``T x T`` matrix is built at once.
    """
    batch, n_heads, length, _ = queries.shape
    n_kv_heads, group = keys.shape[1], n_heads // keys.shape[1]
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // max(1, batch * n_heads * length))
    keys32 = keys.float()
    sums = torch.zeros(batch, n_kv_heads, group, length, dtype=torch.float32, device=keys.device)
    cols = torch.arange(length, device=keys.device)
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        rows = torch.arange(start, stop, device=keys.device)
        allowed = (cols[None, :stop] <= rows[:, None])[None, None, None] & valid[:, None, None, None, :stop]
        grouped = queries[:, :, start:stop].float().reshape(batch, n_kv_heads, group * (stop - start), -1)
        logits = (grouped @ keys32[:, :, :stop].transpose(-1, -2) * scaling).view(
            batch, n_kv_heads, group, stop - start, stop
        )
        probs = _safe_softmax(logits.masked_fill_(~allowed, float("-inf")))
        sums[..., :stop] += probs.sum(dim=3)
    return sums.reshape(batch, n_heads, length)


def pool1d(scores: torch.Tensor, kernel: int, kind: str = "avg") -> torch.Tensor:
    """Stride-1 pooling over the last dim, same length, fp32.

    ``kind="avg"`` counts the zero padding (PyTorch ``count_include_pad``), ``"max"`` pads with
    ``-inf``. ``kernel`` must be odd; ``kernel <= 1`` returns the scores unchanged.
    """
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores.float()
    if kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd, got {kernel}")
    flat = scores.float().reshape(scores.shape[:-1].numel(), 1, scores.shape[-1])
    if kind == "avg":
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    elif kind == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"pooling kind must be 'avg' or 'max', got {kind!r}")
    return pooled.reshape(scores.shape)


def reduce_gqa(scores: torch.Tensor, n_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """Reduce per-query-head scores ``(B, Hq, ...)`` to their KV head ``(B, Hkv, ...)`` (mean or max of the group)."""
    grouped = scores.reshape(scores.shape[0], n_kv_heads, scores.shape[1] // n_kv_heads, *scores.shape[2:])
    if how == "mean":
        return grouped.mean(dim=2)
    if how == "max":
        return grouped.amax(dim=2)
    raise ValueError(f"GQA reduction must be 'mean' or 'max', got {how!r}")


def topk_mask(scores: torch.Tensor, k: torch.Tensor | int, valid: torch.Tensor) -> torch.Tensor:
    """Bool mask ``(B, H, T)`` of the ``k`` highest scores per row; never selects ``valid`` False.

    ``k``: int or ``LongTensor (B, H)`` (may differ per row). ``valid``: ``(B, T)`` or ``(B, H, T)``.
    Ties go to the lower index (stable sort), so the result is deterministic and nested in ``k``.
    """
    if valid.dim() == 2:
        valid = valid[:, None, :].expand_as(scores)
    masked = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    arange = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, arange)  # rank of each slot in the sorted order
    k = torch.as_tensor(k, device=scores.device)
    return (ranks < k.reshape(*k.shape, *([1] * (scores.dim() - k.dim())))) & valid


def valid_ranks(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each valid slot from the start and from the end of its row: two ``LongTensor`` like ``valid``."""
    counts = valid.long().cumsum(-1)
    return counts - 1, counts[..., -1:] - counts


def forced_keep(
    valid: torch.Tensor, budget: torch.Tensor, sinks: int, window: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinks and recent tokens every method keeps first, and how much budget is left for scored tokens.

    ``valid (B, T)`` or ``(B, H, T)`` (valid slots in ascending position order), ``budget (B, H)``,
    ``window`` an int or ``LongTensor (B, H)``.
    Per row: the first ``min(sinks, budget)`` valid tokens, then the last
    ``min(window, budget - sinks)`` valid tokens. So a budget below ``sinks + window`` degrades to
    "sinks + most recent" (spec section 0). Returns ``(mask (B, H, T), rest (B, H))``.
    """
    if valid.dim() == 2:
        valid = valid[:, None, :].expand(-1, budget.shape[1], -1)
    first, last = valid_ranks(valid)
    count = valid.sum(-1)
    budget = torch.minimum(budget, count)
    n_sinks = budget.clamp(max=sinks)
    n_recent = (budget - n_sinks).clamp(max=window)
    mask = valid & ((first < n_sinks[..., None]) | (last < n_recent[..., None]))
    return mask, budget - n_sinks - n_recent


def select_with_forced(
    scores: torch.Tensor,
    valid: torch.Tensor,
    budget: torch.Tensor,
    sinks: int = 0,
    window: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Keep sinks + recent window (:func:`forced_keep`), then the top-scoring rest: bool ``(B, H, T)``.

    ``scores (B, H, T)`` (values on forced slots are ignored), ``budget (B, H)`` kept per row.
    """
    forced, rest = forced_keep(valid, budget, sinks, window)
    if valid.dim() == 2:
        valid = valid[:, None, :]
    return forced | topk_mask(scores, rest, valid & ~forced)


def decode_probs(
    queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scaling: float,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of new decode queries over a layer's stored tokens, fp32: ``(B, Hkv, G, q, L)``.

    ``queries (B, Hq, q, D)``, ``keys (B, Hkv, L, D)`` and ``positions (B, Hkv, L)`` from
    ``HeadwiseLayer.padded()`` (``-1`` on padding slots). The ``q`` queries are the newest tokens:
    query ``i`` sits at position ``p_i = max_position - (q - 1 - i)`` and sees stored positions up to
    it (with a sliding ``window``: only those ``> p_i - window``, as the layer's attention does).
    """
    batch, n_heads, n_new, _ = queries.shape
    n_kv_heads, length = keys.shape[1], keys.shape[2]
    grouped = _grouped(queries, n_kv_heads).float()
    logits = (grouped @ keys.float().transpose(-1, -2) * scaling).view(batch, n_kv_heads, -1, n_new, length)
    query_pos = positions.amax(-1, keepdim=True) - torch.arange(n_new - 1, -1, -1, device=keys.device)
    allowed = (positions[..., None, :] >= 0) & (positions[..., None, :] <= query_pos[..., None])
    if window is not None:
        allowed = allowed & (positions[..., None, :] > query_pos[..., None] - window)
    return _safe_softmax(logits.masked_fill_(~allowed[:, :, None], float("-inf")))


def pooled_row_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float, mask: torch.Tensor,
                         n_prompt: int | None = None, kernel: int = ROW_POOL_KERNEL) -> torch.Tensor:
    """Attention rows reduced as the calibration reduces them (spec/heterocache.md s.2).

    fp32 softmax of ``queries . keys * scaling`` over the keys ``mask`` allows, mean over the query
    heads of each KV head (GQA), cut to the first ``n_prompt`` keys, average-pooled (``kernel``,
    stride 1, zero padding counted). Used by profiling (calibration rows), HeteroCache's prefill
    reference sets and its decode-time drift checks, so all three compare like with like.

    ``queries (B, H, G, s, D)`` (the ``G`` query heads of each of ``H`` KV heads, ``s`` rows),
    ``keys (B, H, L, D)``, ``mask`` bool (True = visible) or additive float, broadcastable to
    ``(B, H, G, s, L)``. Returns ``(B, H, s, n_prompt or L)``; rows with no visible key are zeros.
    """
    logits = torch.einsum("bhgsd,bhld->bhgsl", queries.float(), keys.float()) * scaling
    if mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    else:
        logits = logits + mask.float()
    probs = _safe_softmax(logits).mean(dim=2)
    if n_prompt is not None:
        probs = probs[..., :n_prompt]
    return pool1d(probs, kernel, "avg")


def compact(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Left-align ``values[mask]`` per row keeping slot order, zero-filled: ``(B, H, max kept)``.

    This is the order of ``HeadwiseLayer.padded()`` after ``restrict(mask)`` (ascending positions),
    so per-token state (H2O scores, CAKE indicators) can follow the stored tokens.
    """
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
    width = int(mask.sum(-1).max()) if mask.numel() else 0
    index = order[..., :width]
    return values.gather(-1, index).masked_fill(~mask.gather(-1, index), 0)


def expand_compact(stored: torch.Tensor, slot_valid: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`compact`: per-slot values ``(B, H, L)`` for the valid slots (rank order), zeros elsewhere.

    Slots whose rank is beyond ``stored`` (tokens appended since) get zero.
    """
    rank, _ = valid_ranks(slot_valid)
    padded = F.pad(stored, (0, slot_valid.shape[-1]))
    return padded.gather(-1, rank.clamp(min=0)).masked_fill(~slot_valid, 0)
