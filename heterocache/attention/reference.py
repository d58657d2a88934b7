"""Plain PyTorch ragged attention: the oracle every fast path is tested against.

One loop over (batch row, KV head); explicit fp32 softmax; no padding tricks.
"""

from __future__ import annotations

import torch


def ragged_attention_reference(query: torch.Tensor, keys: list[list[torch.Tensor]], values: list[list[torch.Tensor]],
                               scaling: float, causal_new: int = 0) -> torch.Tensor:
    """Attention of ``query (B, Hq, q, D)`` over per-head token lists.

    ``keys[b][h]`` / ``values[b][h]``: ``(n_bh, D)`` tokens of KV head ``h`` of row ``b`` in
    position order; the last ``causal_new`` (= q when the new tokens are stored) are the new tokens,
    so query token ``t`` sees all but the last ``causal_new - t - 1``. Returns ``(B, q, Hq, D)``.
    """
    b, hq, q, d = query.shape
    h = len(keys[0])
    group = hq // h
    out = torch.zeros((b, q, hq, d), dtype=torch.float32)
    for row in range(b):
        for head in range(hq):
            k = keys[row][head // group].float()
            v = values[row][head // group].float()
            for t in range(q):
                visible = k.shape[0] - (causal_new - t - 1 if causal_new else 0)
                scores = (query[row, head, t].float() @ k[:visible].T) * scaling
                probs = torch.softmax(scores, dim=-1)
                out[row, t, head] = probs @ v[:visible]
    return out.to(query.dtype)
