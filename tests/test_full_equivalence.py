"""FullKV (and every method at keep=1.0) must reproduce DynamicCache + SDPA."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, tiny_model
from transformers import DynamicCache

import heterocache as hc
from heterocache.hf import cache_kwargs

NEW_TOKENS = 32


def _generate(model, ids, mask, cache):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)


def _reference(model, ids, mask):
    model.set_attn_implementation("sdpa")
    return _generate(model, ids, mask, DynamicCache())


def _assert_same(ref, out):
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lengths", [[45], [45, 30, 12]])
def test_full_matches_dynamic_cache(family, lengths):
    model = tiny_model(family)
    ids, mask = left_padded_batch(lengths)
    ref = _reference(model, ids, mask)
    cache = hc.make_cache(model, "full", 1.0)
    _assert_same(ref, _generate(model, ids, mask, cache))
    stats = cache.stats()
    assert stats["prompt_tokens"] == sum(lengths)
    assert stats["keep_fraction"] == 1.0
    assert stats["seen_tokens"] == max(lengths) + NEW_TOKENS - 1  # the last token is never fed


@pytest.mark.parametrize("method", [m for m in hc.available_methods() if m not in ("full", "heterocache")])
def test_every_method_at_keep_one_is_full(method):
    model = tiny_model("llama", layers=3)
    ids, mask = left_padded_batch([70, 41])
    ref = _reference(model, ids, mask)
    cache = hc.make_cache(model, method, 1.0)
    _assert_same(ref, _generate(model, ids, mask, cache))
    assert cache.stats()["keep_fraction"] == 1.0


@pytest.mark.slow
def test_embedded_model_full_matches(embedded):
    model, tok = embedded
    texts = ["The quick brown fox jumps over the lazy dog. " * 6, "Paris is the capital of France and"]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)
    for rows in ([0], [0, 1]):
        ids, mask = batch.input_ids[rows], batch.attention_mask[rows]
        ref = _reference(model, ids, mask)
        out = _generate(model, ids, mask, hc.make_cache(model, "full"))
        _assert_same(ref, out)


@pytest.mark.parametrize("method", hc.available_methods())
def test_bf16_keep_one_matches_dynamic_cache(method):
    """bf16 at keep 1.0: one unpadded row decodes bit for bit like ``DynamicCache`` (the decode runs
    transformers' own SDPA call, GQA by ``enable_gqa``); a left-padded batch, whose rows the cache stores
    without their padding, gives the same tokens with logits within 0.02 (a few bf16 ulps)."""
    model = tiny_model("qwen2", layers=2, heads=8, kv_heads=2, head_dim=32).to(torch.bfloat16)
    for lengths, exact in (([300], True), ([300, 217], False)):
        ids, mask = left_padded_batch(lengths, seed=3)
        runs = []
        for cache in (DynamicCache(config=model.config), hc.make_cache(model, method, 1.0)):
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), max_new_tokens=8,
                                     min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
            runs.append((out.sequences, torch.stack(out.logits).float()))
        assert torch.equal(runs[0][0], runs[1][0])
        if exact:
            assert torch.equal(runs[0][1], runs[1][1])
        else:
            torch.testing.assert_close(runs[1][1], runs[0][1], rtol=0, atol=0.02)
