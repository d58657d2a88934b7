"""Hybrid attention models (sliding-window + full layers): exactness, rings, accounting, profiling.

Tiny random Gemma-3 (alternating), Mistral (every layer slides) and Qwen2 (``max_window_layers``)
decoders with a window of ``WINDOW`` tokens, prompts longer than the window, left padding.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import HYBRID_FAMILIES, WINDOW, hybrid_model, left_padded_batch
from transformers import DynamicCache

import heterocache as hc
from heterocache.hf import cache_kwargs
from heterocache.models import layer_windows
from heterocache.profiling.capture import capture
from heterocache.profiling.profile import HeadProfile

LENGTHS = [45, 23]
NEW_TOKENS = 24  # the rings wrap several times


@functools.cache
def _model(family: str):
    return hybrid_model(family)


def _generate(model, ids, mask, cache, new_tokens=NEW_TOKENS):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


def test_layer_windows_read_from_the_config():
    assert layer_windows(_model("gemma3")) == [WINDOW, None, WINDOW, None]
    assert layer_windows(_model("mistral-sliding")) == [WINDOW] * 4
    assert layer_windows(_model("qwen2-hybrid")) == [None, None, WINDOW, WINDOW]
    assert layer_windows(hybrid_model("mistral-sliding", window=4096)) == [None] * 4  # >= max positions


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_full_is_bit_exact_against_dynamic_cache(family):
    model = _model(family)
    ids, mask = left_padded_batch(LENGTHS)
    model.set_attn_implementation("sdpa")
    ref = _generate(model, ids, mask, DynamicCache(config=model.config))
    cache = hc.make_cache(model, "full", 1.0)
    out = _generate(model, ids, mask, cache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for layer in cache.layers:  # sliding layers hold at most W entries per head, full layers everything
        lengths = layer.padded()[3]
        seen = max(LENGTHS) + NEW_TOKENS - 1
        if layer.window is not None:
            assert int(lengths.max()) == WINDOW and all(bk.capacity == WINDOW for bk in layer.buckets)
        else:
            assert lengths[:, 0].tolist() == [seen - (max(LENGTHS) - n) for n in LENGTHS]


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_multi_token_forwards_after_prefill_are_exact(family):
    model = _model(family)
    ids, mask = left_padded_batch(LENGTHS)
    chunks = [torch.randint(3, 128, (2, q), generator=torch.Generator().manual_seed(q)) for q in (3, 1, 12, 1, 2)]

    def run(cache):
        logits, attention = [], mask
        position = (attention.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits.append(model(ids, attention_mask=attention, position_ids=position, **cache_kwargs(cache, model)).logits)
            for chunk in chunks:
                attention = torch.cat([attention, torch.ones_like(chunk)], dim=-1)
                position = position[:, -1:] + 1 + torch.arange(chunk.shape[1])
                logits.append(model(chunk, attention_mask=attention, position_ids=position,
                                    **cache_kwargs(cache, model)).logits)
        return logits

    model.set_attn_implementation("sdpa")
    ref = run(DynamicCache(config=model.config))
    cache = hc.make_cache(model, "full", 1.0)
    for a, b in zip(ref, run(cache)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    sliding = [layer for layer in cache.layers if layer.window is not None]
    assert all(bk.capacity == WINDOW - 1 + 12 for layer in sliding for bk in layer.buckets)


def test_stats_per_layer_type_at_keep_quarter():
    model = _model("gemma3")
    ids, mask = left_padded_batch(LENGTHS)
    cache = hc.make_cache(model, "snapkv", 0.25)
    _generate(model, ids, mask, cache, new_tokens=1)  # prefill only
    stats = cache.stats()
    n_kv = model.config.num_key_value_heads
    kept_full = sum(int(cache.layers[i].kept_prompt_tokens().sum()) for i in (1, 3))
    kept_sliding = sum(int(cache.layers[i].kept_prompt_tokens().sum()) for i in (0, 2))
    assert stats["keep_fraction_full_layers"] == pytest.approx(kept_full / (sum(LENGTHS) * 2 * n_kv))
    assert stats["keep_fraction_sliding_layers"] == pytest.approx(kept_sliding / (2 * (WINDOW - 1) * 2 * n_kv))
    # row 0: keep * T = 11.25 per head > W - 1 = 7, capped; row 1: 5.75 (6 on layers 0-2, 5 on layer 3)
    assert stats["keep_fraction_sliding_layers"] == pytest.approx((8 * 7 + 8 * 6) / (2 * 7 * 8))
    assert stats["kept_tokens"] == 180 + 92 and stats["keep_fraction"] == 0.25  # the excess went to full layers
    assert stats["device_bytes_full_layers"] + stats["device_bytes_sliding_layers"] == stats["device_bytes"]
    full = hc.make_cache(model, "full", 1.0)
    _generate(model, ids, mask, full, new_tokens=1)
    assert full.stats()["keep_fraction_sliding_layers"] == 1.0 and full.stats()["keep_fraction_full_layers"] == 1.0
    assert full.stats()["keep_fraction"] == pytest.approx((2 * sum(LENGTHS) + 2 * 2 * (WINDOW - 1)) / (4 * sum(LENGTHS)))


def test_window_mismatch_is_a_clear_error():
    model = hybrid_model("gemma3")
    cache = hc.make_cache(model, "full", 1.0)
    model.config.layer_types = ["full_attention"] * 4  # the modules still slide
    cache.layer_windows = [None] * 4
    for layer in cache.layers:
        layer.window = None
    ids, mask = left_padded_batch(LENGTHS)
    with pytest.raises(RuntimeError, match="sliding_window=8"):
        _generate(model, ids, mask, cache, new_tokens=1)


@functools.cache
def _profile(family: str) -> HeadProfile:
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(5))
    return hc.profile_heads(_model(family), input_ids=ids, max_new_tokens=6, topk=16, cache_dir=False,
                            progress=False, stable_threshold=0.0, sim_threshold=0.0)


def test_capture_skips_sliding_layers():
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(5))  # longer than the window
    result = capture(_model("gemma3"), ids, max_new_tokens=4, topk=8, progress=False)
    assert result.layers == [1, 3] and result.topk_indices.shape == (2, 4, 1, 4, 8)
    assert result.layer_windows == [WINDOW, None, WINDOW, None]


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_profile_records_layer_types_and_round_trips(family, tmp_path):
    profile = _profile(family)
    windows = layer_windows(_model(family))
    assert profile.format == "heterocache.profile/2"
    assert profile.model["layer_types"] == ["sliding_attention" if w else "full_attention" for w in windows]
    assert profile.layer_windows() == windows
    for layer, window in enumerate(windows):
        for record in profile.heads[layer]:
            if window is not None:
                assert record.role == "sliding" and (record.stability, record.weight, record.pivot) == (None,) * 3
            else:
                assert record.role in ("pivot", "satellite")  # thresholds 0: one star per full layer
    loaded = HeadProfile.load(profile.save(tmp_path / "p.json"))
    assert loaded.to_dict() == profile.to_dict()
    loaded.check_model(_model(family))
    data = json.loads((tmp_path / "p.json").read_text())
    data["heads"][windows.index(WINDOW)][0]["labels"] = ["anchor", None]
    with pytest.raises(ValueError, match="sliding-window layers"):
        HeadProfile.from_dict(data)
    with pytest.raises(ValueError, match="another attention layout"):
        loaded.check_model(hybrid_model(family, window=WINDOW + 2))


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_heterocache_end_to_end(family):
    model = _model(family)
    ids, mask = left_padded_batch(LENGTHS)
    cache = hc.make_cache(model, "heterocache", 0.25, profile=_profile(family), steps=1, retrieval="sync",
                          sinks=0, window=4)
    _generate(model, ids, mask, cache, new_tokens=8)
    stats = cache.stats()
    windows = layer_windows(model)
    full_layers = [i for i, w in enumerate(windows) if w is None]
    assert stats["retrieval_checks"] > 0 if full_layers else stats["retrieval_checks"] == 0
    assert set(cache.method.runtime.layers) <= set(full_layers)  # stars only on full-attention layers
    for layer in cache.layers:
        if layer.window is not None:
            assert int(layer.padded()[3].max()) <= WINDOW
    model.set_attn_implementation("sdpa")
    ref = _generate(model, ids, mask, DynamicCache(config=model.config), new_tokens=8)
    keep_one = hc.make_cache(model, "heterocache", 1.0, profile=_profile(family))
    assert torch.equal(_generate(model, ids, mask, keep_one, new_tokens=8).sequences, ref.sequences)


@pytest.mark.parametrize("method,options", [("h2o", {"decode_eviction": True}),
                                            ("streamingllm", {"evict_during_decode": True}),
                                            ("tova", {})])
def test_decode_eviction_drops_tokens_that_left_the_window(method, options):
    model = _model("gemma3")
    ids, mask = left_padded_batch(LENGTHS)
    cache = hc.make_cache(model, method, 0.25, **options)
    _generate(model, ids, mask, cache, new_tokens=12)
    for layer in cache.layers:
        _, _, positions, lengths = layer.padded()
        budget = cache.budget[:, layer.layer_idx]
        assert bool((lengths <= budget).all())  # evicted back to the prompt budget every step
        if layer.window is not None:  # and nothing the next query cannot see
            assert not ((positions >= 0) & (positions <= layer.seen - layer.window)).any()
