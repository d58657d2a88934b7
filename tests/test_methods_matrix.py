"""Every registered method x keep x tiny model family through ``model.generate``.

Checks the budget accounting on the real cache (docs/DESIGN.md section 2): per batch row the kept
prompt entries over layers x KV heads equal ``round(keep * L * n_layers * n_kv_heads)``, padding is
never stored, and ``keep=1.0`` generates exactly FullKV's tokens.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import FAMILIES, HYBRID_FAMILIES, WINDOW, hybrid_model, left_padded_batch, tiny_model
from transformers import DynamicCache

import heterocache as hc
from heterocache.budget import sliding_cap, total_budget
from heterocache.hf import cache_kwargs
from heterocache.methods.heterocache import HeteroCache
from heterocache.methods.heterocache.dynamic import sketch_tokens, summary_tokens
from heterocache.models import layer_windows

LENGTHS = [53, 30]  # odd prompt length, left padding in row 1
NEW_TOKENS = 4
EVICTS_DURING_DECODE = {"tova"}  # default options evict during decode: the cache size is what is exact
PAPER = "heterocache[paper]"  # the paper's mechanism: profile roles, drift-triggered satellite refresh
METHODS = [*hc.available_methods(), PAPER]


@functools.cache
def _model(family: str):
    return tiny_model(family, layers=2, heads=8, kv_heads=4)


def _generate(model, ids, mask, cache):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False)


@functools.cache
def _profile(family: str) -> hc.HeadProfile:
    """A head profile of the tiny model, calibrated in the test on random token ids (not cached on disk).

    Thresholds 0: every pair of heads counts as similar, so each layer is one star (a pivot and three
    satellites) and the drift checks and refreshes run inside the matrix."""
    ids = torch.randint(3, 128, (1, 96), generator=torch.Generator().manual_seed(11))
    return hc.profile_heads(_model(family), input_ids=ids, max_new_tokens=6, topk=16, cache_dir=False,
                            progress=False, stable_threshold=0.0, sim_threshold=0.0)


def _options(method: str, profile) -> tuple[str, dict]:
    """``(registered name, options)`` of a matrix entry.

    heterocache (dynamic retrieval, the default): no sinks and a 1-token recent window, so keep 0.1 of the
    30-token row still meets its floor of sinks + window + 1 per head after paying for the page summaries.
    The paper's mode: retrieval "sync" with a check every step, so the drift path runs inside the matrix."""
    if method == "heterocache":
        return method, {"sinks": 0, "window": 1}
    if method == PAPER:
        return "heterocache", {"profile": profile, "steps": 1, "retrieval": "sync", "sinks": 0, "window": 4}
    return method, {}


def _expected(method: str, keep: float, n: int, n_layers: int, n_kv: int, retrieving_layers: int,
              head_dim: int = 16) -> int:
    """Kept prompt entries of one row: the total of DESIGN s.2, minus heterocache's device index (paid
    from the budget by the heads of full-attention layers: the sketch or page means ``auto`` picks for
    ``keep``, int8 + fp32 channel scales vs fp32 K/V)."""
    total = total_budget(keep, n, n_layers, n_kv)
    if method == "heterocache" and keep < 1.0:
        plan = HeteroCache()
        plan.head_dim = head_dim
        if plan.resolved_index(keep) == "sketch":
            cost = sketch_tokens(n, min(plan.resolved_rank(keep), head_dim, n), head_dim, 1, 4)
        else:
            cost = summary_tokens(n, plan.resolved_page(keep), 1, 4)
        total -= math.ceil(cost * retrieving_layers * n_kv)
    return total


@functools.cache
def _reference(family: str) -> torch.Tensor:
    model = _model(family)
    ids, mask = left_padded_batch(LENGTHS)
    model.set_attn_implementation("sdpa")
    return _generate(model, ids, mask, DynamicCache())


CASES = [(m, k) for m in METHODS for k in (1.0, 0.5, 0.1) if m != "full" or k == 1.0]


@pytest.mark.parametrize("method,keep", CASES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_method_matrix(family, method, keep):
    model = _model(family)
    ids, mask = left_padded_batch(LENGTHS)
    name, options = _options(method, _profile(family) if method == PAPER else None)
    cache = hc.make_cache(model, name, keep, **options)
    out = _generate(model, ids, mask, cache)
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    expected = [_expected(method, keep, n, n_layers, n_kv, n_layers, model.config.head_dim) for n in LENGTHS]
    prompt_len = ids.shape[1]
    kept = torch.stack([layer.kept_prompt_tokens() for layer in cache.layers])  # (layers, B, Hkv)
    stored = torch.stack([layer.padded()[3] for layer in cache.layers])
    for layer in cache.layers:  # padding slots of row 1 are never stored
        positions = layer.padded()[2][1]
        assert not ((positions >= 0) & (positions < prompt_len - LENGTHS[1])).any()
    stats = cache.stats()
    if keep == 1.0:
        assert torch.equal(out, _reference(family))
        assert stats["keep_fraction"] == 1.0
    elif method in EVICTS_DURING_DECODE:
        assert stored.sum(dim=(0, 2)).tolist() == expected  # generated tokens compete for the slots
        assert stats["keep_fraction"] <= keep + 1e-9
    elif name == "heterocache" and "profile" not in options:
        # dynamic retrieval: a head's remainder tokens (fewer than a page) cost its layer a page of slots,
        # so fewer than a page per head may stay unused
        page = cache.method.resolved_page(keep)
        for got, want in zip(kept.sum(dim=(0, 2)).tolist(), expected):
            assert want - page * n_layers * n_kv < got <= want
        assert stats["keep_fraction"] <= keep + 1e-9
    else:
        assert kept.sum(dim=(0, 2)).tolist() == expected
        assert stats["kept_tokens"] == sum(expected)
        assert stats["keep_fraction"] == pytest.approx(sum(expected) / (sum(LENGTHS) * n_layers * n_kv))
        # decode tokens are appended to every head
        assert (stored - kept == NEW_TOKENS - 1).all()


@pytest.mark.parametrize("method,options", [("h2o", {"decode_eviction": True}),
                                            ("streamingllm", {"evict_during_decode": True}),
                                            ("tova", {"evict_during_decode": False}),
                                            ("cake", {"cascading": False})])
def test_decode_options_on_real_cache(method, options):
    model = _model("qwen2")
    ids, mask = left_padded_batch(LENGTHS)
    cache = hc.make_cache(model, method, 0.3, **options)
    _generate(model, ids, mask, cache)
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    expected = [total_budget(0.3, n, n_layers, n_kv) for n in LENGTHS]
    stored = torch.stack([layer.padded()[3] for layer in cache.layers]).sum(dim=(0, 2))
    if options.get("decode_eviction") or options.get("evict_during_decode"):
        assert stored.tolist() == expected
    else:
        assert (stored - n_layers * n_kv * (NEW_TOKENS - 1)).tolist() == expected


# --- hybrid families: sliding-window layers next to (or instead of) full-attention layers -----------------
HYBRID_CASES = [(m, k) for m in METHODS for k in (1.0, 0.5, 0.25) if m != "full" or k == 1.0]


@functools.cache
def _hybrid_model(family: str):
    return hybrid_model(family, layers=4, heads=8, kv_heads=4)


@functools.cache
def _hybrid_profile(family: str) -> hc.HeadProfile:
    ids = torch.randint(3, 128, (1, 96), generator=torch.Generator().manual_seed(11))
    return hc.profile_heads(_hybrid_model(family), input_ids=ids, max_new_tokens=6, topk=16, cache_dir=False,
                            progress=False, stable_threshold=0.0, sim_threshold=0.0)


@functools.cache
def _hybrid_reference(family: str) -> torch.Tensor:
    model = _hybrid_model(family)
    ids, mask = left_padded_batch(LENGTHS)
    model.set_attn_implementation("sdpa")
    return _generate(model, ids, mask, DynamicCache(config=model.config))


@pytest.mark.parametrize("method,keep", HYBRID_CASES)
@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrid_method_matrix(family, method, keep):
    """docs/DESIGN.md s.2 on hybrid models: per row the kept prompt entries are
    ``min(round(keep * T * L * H), what the layers can use)`` with sliding heads at most ``min(T, W - 1)``
    reachable tokens; rings never exceed W entries per head during decode."""
    model = _hybrid_model(family)
    ids, mask = left_padded_batch(LENGTHS)
    name, options = _options(method, _hybrid_profile(family) if method == PAPER else None)
    windows = layer_windows(model)
    n_layers, n_kv = len(windows), model.config.num_key_value_heads
    prompt_len = ids.shape[1]

    prefill = hc.make_cache(model, name, keep, **options)
    with torch.no_grad():  # one new token: the prefill only, before any ring overwrite
        model.generate(ids, attention_mask=mask, **cache_kwargs(prefill, model), max_new_tokens=1, do_sample=False)
    capacity = [n_kv * sum(sliding_cap(n, w) for w in windows) for n in LENGTHS]
    retrieving = sum(w is None for w in windows)
    head_dim = prefill.layers[0].head_dim
    expected = [min(_expected(method, keep, n, n_layers, n_kv, retrieving, head_dim), c)
                for n, c in zip(LENGTHS, capacity)]
    kept = torch.stack([layer.kept_prompt_tokens() for layer in prefill.layers])  # (layers, B, Hkv)
    if name == "heterocache" and "profile" not in options and keep < 1.0:  # remainder pages, as above
        page = prefill.method.resolved_page(keep)
        for got, want in zip(kept.sum(dim=(0, 2)).tolist(), expected):
            assert want - page * retrieving * n_kv <= got <= want
    else:
        assert kept.sum(dim=(0, 2)).tolist() == expected
    for layer, window in zip(prefill.layers, windows):
        positions = layer.padded()[2]
        assert not ((positions >= 0) & (positions < prompt_len - LENGTHS[1]))[1].any()  # no padding
        if window is not None:  # only tokens a later query can see
            assert not ((positions >= 0) & (positions <= prompt_len - window)).any()
            assert bool((layer.kept_prompt_tokens() <= WINDOW - 1).all())

    cache = hc.make_cache(model, name, keep, **options)
    out = _generate(model, ids, mask, cache)
    if keep == 1.0:
        assert torch.equal(out, _hybrid_reference(family))
    for layer in cache.layers:
        if layer.window is not None:
            assert int(layer.padded()[3].max()) <= WINDOW
            assert all(bk.capacity <= WINDOW for bk in layer.buckets)
