"""FanoutCache: one prefill forward fills many caches exactly as their own prefills would (heterocache/fanout.py)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import hybrid_model, left_padded_batch, tiny_model
from transformers import DynamicCache

import heterocache as hc
from heterocache.fanout import FanoutCache
from heterocache.hf import cache_kwargs

LENGTHS = [53, 30]  # odd prompt length, left padding in row 1 (longer than the hybrid window of 8)
DECODE_STEPS = 3
RETRIEVING = {"sinks": 0, "window": 1}  # heterocache retrieves on the 53-token row at these options
PAPER = "heterocache[paper]"
JOBS = [("full", 1.0), ("snapkv", 0.25), ("snapkv", 0.5), ("h2o", 0.25), ("h2o", 0.5),
        ("heterocache", 0.25), ("heterocache", 0.5), (PAPER, 0.25)]


@functools.cache
def _model(family: str):
    if family == "gemma3":
        return hybrid_model("gemma3", layers=4, heads=8, kv_heads=4)
    return tiny_model(family, layers=2, heads=8, kv_heads=4)


@functools.cache
def _profile(family: str) -> hc.HeadProfile:
    """Thresholds 0: one star per full-attention layer, so the paper mode's drift path runs."""
    ids = torch.randint(3, 128, (1, 96), generator=torch.Generator().manual_seed(11))
    return hc.profile_heads(_model(family), input_ids=ids, max_new_tokens=6, topk=16, cache_dir=False,
                            progress=False, stable_threshold=0.0, sim_threshold=0.0)


def _make(family: str, method: str, keep: float):
    model = _model(family)
    if method == PAPER:
        return hc.make_cache(model, "heterocache", keep, profile=_profile(family), retrieval="sync", steps=1,
                             sinks=0, window=4)
    return hc.make_cache(model, method, keep, **(RETRIEVING if method == "heterocache" else {}))


def _forward(model, cache, ids, mask) -> torch.Tensor:
    """One forward of ``ids (B, q)`` (``mask (B, T)`` covers the cache and ``ids``) -> logits ``(B, q, V)``."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     **cache_kwargs(cache, model)).logits


def _decode(model, cache, logits, mask) -> list[torch.Tensor]:
    """Greedy decode steps after a prefill whose last logits are ``logits (B, V)``: each step's logits."""
    out = []
    for _ in range(DECODE_STEPS):
        token = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        logits = _forward(model, cache, token, mask)[:, -1]
        out.append(logits)
    return out


def _timeless(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if not k.endswith("_s")}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_fanout_fills_every_cache_as_its_own_prefill(family):
    model = _model(family)
    ids, mask = left_padded_batch(LENGTHS)
    children = [_make(family, m, k) for m, k in JOBS] + [DynamicCache(config=model.config)]
    fanout = FanoutCache(children)
    shared = _forward(model, fanout, ids, mask)
    assert fanout.get_seq_length() == ids.shape[1]
    for keep in (0.25, 0.5):  # the retrieval path is part of the comparison (the long row at least)
        assert children[JOBS.index(("heterocache", keep))].method.retrieves(keep, LENGTHS[0])
    assert all(c.compress_s > 0 for c in children[:-1]) and fanout.compress_s[-1] == 0.0
    for (method, keep), child in zip(JOBS, children):
        alone = _make(family, method, keep)
        own = _forward(model, alone, ids, mask)
        assert torch.equal(shared, own), (method, keep)
        for mine, ref in zip(child.layers, alone.layers):
            for a, b in zip(mine.padded(), ref.padded()):
                assert torch.equal(a, b), (method, keep, mine.layer_idx)
        assert _timeless(child.stats()) == _timeless(alone.stats()), (method, keep)
        assert child.stats()["compress_s"] == child.compress_s > 0
        steps, ref_steps = _decode(model, child, shared[:, -1], mask), _decode(model, alone, own[:, -1], mask)
        for step, (a, b) in enumerate(zip(steps, ref_steps)):
            assert torch.equal(a, b), (method, keep, step)
        assert _timeless(child.stats()) == _timeless(alone.stats()), (method, keep)
        child.close()
        alone.close()
    dense, reference = children[-1], DynamicCache(config=model.config)
    own = _forward(model, reference, ids, mask)
    assert torch.equal(shared, own)
    for mine, ref in zip(dense.layers, reference.layers):
        assert torch.equal(mine.keys, ref.keys) and torch.equal(mine.values, ref.values)
    for a, b in zip(_decode(model, dense, shared[:, -1], mask), _decode(model, reference, own[:, -1], mask)):
        assert torch.equal(a, b)


def test_fanout_refuses_what_one_prefill_cannot_fill():
    model, other = _model("llama"), tiny_model("llama", seed=1, layers=2, heads=8, kv_heads=4)
    ids, mask = left_padded_batch(LENGTHS)
    used = hc.make_cache(model, "snapkv", 0.5)
    _forward(model, used, ids, mask)
    cases = [
        ([used, hc.make_cache(model, "full")], "not empty"),
        ([hc.make_cache(model, "full"), hc.make_cache(other, "full")], "different models"),
        ([DynamicCache(config=model.config)], "at least one HeadwiseCache"),
        ([hc.make_cache(model, "full"), DynamicCache(), DynamicCache()], "at most one DynamicCache"),
    ]
    same = hc.make_cache(model, "h2o", 0.5)
    cases.append(([same, same], "same cache twice"))
    for children, message in cases:
        with pytest.raises(ValueError, match=message):
            FanoutCache(children)
    dense = DynamicCache()
    _forward(model, dense, ids, mask)
    with pytest.raises(ValueError, match="not empty"):
        FanoutCache([hc.make_cache(model, "full"), dense])
    fanout = FanoutCache([hc.make_cache(model, "snapkv", 0.5), hc.make_cache(model, "full")])
    _forward(model, fanout, ids, mask)
    with pytest.raises(ValueError, match="exactly one prefill forward"):
        _forward(model, fanout, ids[:, -1:], torch.cat([mask, mask[:, -1:]], dim=-1))
