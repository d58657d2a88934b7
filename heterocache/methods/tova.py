"""TOVA, token omission via attention (Oren et al., 2024, "Transformers are Multi-State RNNs").
Headline: nearly on par with the full model using 1/8 of the cache; up to 4.8x throughput."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heterocache.methods.base import DecodeContext, Method, PrefillContext
from heterocache.methods.scoring import decode_probs, topk_mask, window_attention


@dataclass
class TOVA(Method):
    """Keep the tokens the **last** query attends to most, averaged over all query heads of the layer.

    Prefill: the last prompt token's attention row (fp32), mean over all ``Hq`` heads, gives one
    score per token and layer; each KV head keeps its top ``C`` (no sinks, no window). Budget:
    uniform ``C = keep * L`` per (layer, KV head); within a layer budgets differ by at most one, so
    the heads hold nested top-``C`` sets of the same ranking (the paper's single set per layer).

    ``evict_during_decode=True`` (the original, default): after each decode step the newest query's
    attention (averaged over the query heads of every KV head holding the token) re-ranks the stored
    tokens and each head drops its lowest-scoring ones back to ``C``; generated tokens compete for
    the slots. False: prefill only (kvpress behaviour), decode tokens appended. On sliding-window
    layers the scores only count keys inside the window and tokens that left it are dropped.

    Parameters
    ----------
    evict_during_decode : bool
        Keep every head at ``C`` tokens during decode (default True).
    """

    name = "tova"
    description = "TOVA: last-query attention (head mean), evicts during decode"

    evict_during_decode: bool = True

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        if ctx.keeps_everything():
            return ctx.keep_all()
        last_row = window_attention(ctx.queries, ctx.keys, 1, ctx.scaling, ctx.valid)[:, :, 0]  # (B, Hq, T)
        scores = last_row.mean(dim=1, keepdim=True).expand(-1, ctx.n_kv_heads, -1)
        return topk_mask(scores, ctx.budget, ctx.valid)

    def on_decode_step(self, ctx: DecodeContext) -> None:
        if not self.evict_during_decode:
            return
        keys, _, positions, lengths = ctx.layer.padded()
        budget = ctx.budget.to(keys.device)
        slot_valid = ctx.reachable(positions)
        if not bool((lengths > budget).any()) and bool(torch.equal(slot_valid, positions >= 0)):
            return
        scores = decode_probs(ctx.queries, keys, positions, ctx.scaling, ctx.window)[:, :, :, -1].mean(2)
        # one ranking per layer: average each position's score over the KV heads that hold it
        index = positions.clamp(min=0).flatten(1)
        span = int(positions.max()) + 1
        total = scores.new_zeros(scores.shape[0], span).scatter_add_(1, index, (scores * slot_valid).flatten(1))
        count = scores.new_zeros(scores.shape[0], span).scatter_add_(1, index, slot_valid.float().flatten(1))
        shared = (total / count.clamp(min=1)).gather(1, index).view_as(scores)
        ctx.layer.restrict(topk_mask(shared, budget, slot_valid))
