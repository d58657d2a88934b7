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
from heterocache.models import layer_windows
from heterocache.retrieval.index import sketch_tokens, summary_tokens

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
              head_dim: int = 16, retrieves: bool = True) -> int:
    """Kept prompt entries of one row: the total of DESIGN s.2, minus heterocache's device index (paid
    from the budget by the heads of full-attention layers: the sketch or page means ``auto`` picks for
    ``keep``, int8 + fp32 channel scales vs fp32 K/V) when the prompt is served with retrieval."""
    total = total_budget(keep, n, n_layers, n_kv)
    if method == "heterocache" and keep < 1.0 and retrieves:
        plan = HeteroCache()
        plan.head_dim = head_dim
        if plan.resolved_index(keep) == "sketch":
            cost = sketch_tokens(n, min(plan.resolved_rank(keep), head_dim, n), head_dim, 1, 4)
        else:
            cost = summary_tokens(n, plan.resolved_page(keep), 1, 4)
        total -= math.ceil(cost * retrieving_layers * n_kv)
    return total


RETRIEVING_PEERS = {"quest", "shadowkv", "omnikv"}  # methods on the shared retrieval engine, metadata paid


def _peer_metadata_tokens(cache) -> float:
    """A retrieving peer's own device bytes (indexes, landmarks, low-rank factors) in kept-token units;
    a device-resident tier (Quest as published) is not paid from the budget."""
    stats = cache.method.stats()
    own = stats["device_bytes"] - (stats.get("device_tier_bytes", 0))
    layer = next(layer for layer in cache.layers if layer.buckets)
    return own / (2 * layer.head_dim * torch.empty((), dtype=layer.dtype).element_size())


def _check_peer_accounting(cache, kept_total: int, total: int, retrieving_heads: int) -> None:
    """Kept prompt tokens + the metadata's token-equivalent stay within the total of DESIGN s.2; what a
    retrieving head leaves unused is less than two pages (a remainder token costs a page of slots, and
    the slots are whole pages)."""
    meta = _peer_metadata_tokens(cache)
    page = getattr(cache.method, "page", 1)
    assert kept_total + meta <= total + 1e-6
    assert kept_total + meta > total - 2 * page * retrieving_heads - 1


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
    dynamic = name == "heterocache" and "profile" not in options
    retrieves = [dynamic and cache.method.retrieves(keep, n) for n in LENGTHS]
    expected = [_expected(method, keep, n, n_layers, n_kv, n_layers, model.config.head_dim, r)
                for n, r in zip(LENGTHS, retrieves)]
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
    elif dynamic and any(retrieves):
        # dynamic retrieval: a head's remainder tokens (fewer than a page) cost its layer a page of slots,
        # so fewer than a page per head may stay unused; a row served without retrieval keeps its total
        page = cache.method.resolved_page(keep)
        for got, want, r in zip(kept.sum(dim=(0, 2)).tolist(), expected, retrieves):
            assert want - page * n_layers * n_kv < got <= want if r else got == want
        assert stats["keep_fraction"] <= keep + 1e-9
    elif method in RETRIEVING_PEERS and cache.method.engine.layers:
        _check_peer_accounting(cache, int(kept.sum()), sum(expected), len(LENGTHS) * n_layers * n_kv)
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
    dynamic = name == "heterocache" and "profile" not in options and keep < 1.0
    retrieves = [dynamic and prefill.method.retrieves(keep, n) for n in LENGTHS]
    expected = [min(_expected(method, keep, n, n_layers, n_kv, retrieving, head_dim, r), c)
                for n, c, r in zip(LENGTHS, capacity, retrieves)]
    kept = torch.stack([layer.kept_prompt_tokens() for layer in prefill.layers])  # (layers, B, Hkv)
    if any(retrieves):  # remainder pages, as above
        page = prefill.method.resolved_page(keep)
        for got, want, r in zip(kept.sum(dim=(0, 2)).tolist(), expected, retrieves):
            assert want - page * retrieving * n_kv <= got <= want if r else got == want
    elif method in RETRIEVING_PEERS and keep < 1.0 and prefill.method.engine.layers:
        _check_peer_accounting(prefill, int(kept.sum()), sum(expected), len(LENGTHS) * retrieving * n_kv)
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


# --- every generate mode: any prompt length, beam search, assisted decoding, row edits ----------------------
SHORT_LENGTHS = (1, 8, 37, 120, 400)
COMPRESSING = [m for m in METHODS if m != "full"]


def _family_model(family: str):
    return _model(family) if family in FAMILIES else _hybrid_model(family)


def _family_profile(family: str) -> hc.HeadProfile:
    return _profile(family) if family in FAMILIES else _hybrid_profile(family)


def _default_options(method: str, family: str) -> tuple[str, dict]:
    """The method with its default options (the paper's mode: the tiny model's profile, a check every step)."""
    if method == PAPER:
        return "heterocache", {"profile": _family_profile(family), "retrieval": "sync", "steps": 1}
    return method, {}


@pytest.mark.parametrize("method", COMPRESSING)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_every_prompt_length(family, method):
    """Every method with its default options at keep 0.1 / 0.25 / 0.5 on prompts of 1 to 400 tokens:
    generation runs and the kept prompt entries are the total of DESIGN s.2 (HeteroCache's default
    serves a prompt whose index cannot pay for itself without retrieval: the whole total, static)."""
    model = _family_model(family)
    name, options = _default_options(method, family)
    windows = layer_windows(model)
    n_layers, n_kv = len(windows), model.config.num_key_value_heads
    retrieving = sum(w is None for w in windows)
    gen = torch.Generator().manual_seed(3)
    for keep in (0.1, 0.25, 0.5):
        for n in SHORT_LENGTHS:
            ids = torch.randint(3, 128, (1, n), generator=gen)
            prefill = hc.make_cache(model, name, keep, **options)
            with torch.no_grad():  # one token: the accounting before decode eviction and ring overwrites
                model.generate(ids, **cache_kwargs(prefill, model), max_new_tokens=1, do_sample=False)
            kept = prefill.stats()["kept_tokens"]
            capacity = n_kv * sum(sliding_cap(n, w) for w in windows)
            if method == "heterocache" and prefill.method.retrieves(keep, n):
                want = min(_expected(method, keep, n, n_layers, n_kv, retrieving, model.config.head_dim), capacity)
                page = prefill.method.resolved_page(keep)
                assert want - page * retrieving * n_kv <= kept <= want, (keep, n)
            elif method in RETRIEVING_PEERS and prefill.method.engine.layers:
                _check_peer_accounting(prefill, kept, min(total_budget(keep, n, n_layers, n_kv), capacity),
                                       retrieving * n_kv)
            else:
                assert kept == min(total_budget(keep, n, n_layers, n_kv), capacity), (keep, n)
            assert prefill.stats()["keep_fraction"] == pytest.approx(kept / (n * n_layers * n_kv))
            cache = hc.make_cache(model, name, keep, **options)
            with torch.no_grad():
                out = model.generate(ids, **cache_kwargs(cache, model), max_new_tokens=4, min_new_tokens=4,
                                     do_sample=False)
            assert out.shape == (1, n + 4)
    if method == "heterocache":  # the long prompt does retrieve: both paths ran
        assert prefill.method.retrieves(0.25, 400) and cache.stats()["retrieval_bytes"] > 0


def test_default_serves_short_prompts_on_the_embedded_model(embedded):
    """The issue's case: at keep 0.25 the embedded model's 90 heads cannot pay for an index on short
    prompts; the default still serves them (static, whole budget) and retrieves from ~400 tokens on."""
    model, _ = embedded
    gen = torch.Generator().manual_seed(5)
    for n in (20, 60, 120, 200, 600):
        cache = hc.make_cache(model, "heterocache", 0.25)
        ids = torch.randint(10, 1000, (1, n), generator=gen)
        with torch.no_grad():
            out = model.generate(ids, **cache_kwargs(cache, model), max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert out.shape == (1, n + 3)
        stats = cache.stats()
        assert stats["keep_fraction"] <= 0.25 + 1e-9
        assert cache.method.retrieves(0.25, n) == (n >= 400)


BEAM_LENGTHS = [400, 333]


def _beams(model, ids, mask, cache):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), num_beams=3,
                              max_new_tokens=6, min_new_tokens=6, do_sample=False)


@functools.cache
def _beam_reference(family: str) -> torch.Tensor:
    model = _family_model(family)
    ids, mask = left_padded_batch(BEAM_LENGTHS, seed=5)
    return _beams(model, ids, mask, DynamicCache(config=model.config))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_beam_search(family, method):
    """3 beams over a left-padded batch of two prompts: keep 1.0 gives ``DynamicCache``'s beams; keep 0.25
    runs (the reorders move every per-row state: HeteroCache's slots and tier rows keep retrieving)."""
    model = _family_model(family)
    ids, mask = left_padded_batch(BEAM_LENGTHS, seed=5)
    name, options = _options(method, _family_profile(family) if method == PAPER else None)
    for keep in (1.0, 0.25):
        if method == "full" and keep < 1.0:
            continue
        cache = hc.make_cache(model, name, keep, **options)
        out = _beams(model, ids, mask, cache)
        if keep == 1.0:
            assert torch.equal(out, _beam_reference(family))
        else:
            assert out.shape == _beam_reference(family).shape
            assert cache.stats()["keep_fraction"] <= keep + 1e-9
            if method == "heterocache":
                assert cache.stats()["retrieval_bytes"] > 0


def _steps(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """Feed ``ids (B, n)`` one token at a time; the last step's logits ``(B, V)``."""
    with torch.no_grad():
        for i in range(ids.shape[1]):
            logits = model(ids[:, i:i + 1], **cache_kwargs(cache, model)).logits[:, -1]
    return logits


ROW_CASES = [("heterocache", {"sinks": 0, "window": 1}),
             ("heterocache", {"sinks": 0, "window": 1, "refill": "torch", "refresh_drift": 0.0}),
             ("heterocache", {"sinks": 0, "window": 1, "offload": "disk"}),
             (PAPER, {}), ("h2o", {"decode_eviction": True}), ("tova", {}), ("snapkv", {})]


@pytest.mark.parametrize("edit", ["reorder", "repeat"])
@pytest.mark.parametrize("method,extra", ROW_CASES)
def test_row_edits_match_a_cache_built_in_that_order(method, extra, edit):
    """``reorder_cache([2, 0, 0])`` (or ``batch_repeat_interleave(2)``) after prefill + 3 decode steps, then
    3 more steps, gives the logits of a cache that saw those rows in that order from the start: the
    method's per-row state (slots, tier rows, drift anchors, H2O scores, pivot references) follows."""
    model = _model("llama")
    gen = torch.Generator().manual_seed(9)
    prompts = torch.randint(3, 128, (3, 400), generator=gen)
    first, then = torch.randint(3, 128, (3, 3), generator=gen), torch.randint(3, 128, (3, 3), generator=gen)
    order = torch.tensor([2, 0, 0]) if edit == "reorder" else torch.arange(3).repeat_interleave(2)
    name, options = _options(method, _profile("llama") if method == PAPER else None)
    options = {**options, **extra}

    edited = hc.make_cache(model, name, 0.25, **options)
    with torch.no_grad():
        model(prompts, **cache_kwargs(edited, model))
    _steps(model, edited, first)
    if edit == "reorder":
        edited.reorder_cache(order)
    else:
        edited.batch_repeat_interleave(2)
    got = _steps(model, edited, then[order])

    built = hc.make_cache(model, name, 0.25, **options)
    with torch.no_grad():
        model(prompts[order], **cache_kwargs(built, model))
    _steps(model, built, first[order])
    want = _steps(model, built, then[order])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert edited.stats()["kept_tokens"] == built.stats()["kept_tokens"]
    if name == "heterocache" and method != PAPER:
        for name in ("device_used_bytes", "summary_bytes"):  # (headroom differs: the edit re-stores)
            assert edited.stats()[name] == built.stats()[name]
        assert edited.stats()[f"{'disk' if extra.get('offload') == 'disk' else 'host'}_bytes"] == \
            built.stats()[f"{'disk' if extra.get('offload') == 'disk' else 'host'}_bytes"]


def _greedy(model, ids, cache, **mode):
    with torch.no_grad():
        return model.generate(ids, **cache_kwargs(cache, model), max_new_tokens=10, do_sample=False, **mode)
        # (no min_new_tokens: transformers 5.2 refuses it with an assistant model)


@functools.cache
def _assisted_prompt() -> torch.Tensor:
    """Repeated n-grams, so prompt lookup finds drafts in the prompt."""
    pattern = torch.randint(3, 128, (1, 25), generator=torch.Generator().manual_seed(4))
    return pattern.repeat(1, 16)  # 400 tokens


@pytest.mark.parametrize("mode", ["assistant_model", "prompt_lookup_num_tokens"])
@pytest.mark.parametrize("method", METHODS)
def test_assisted_decoding(method, mode):
    """Assisted decoding (a draft model, or drafts looked up in the prompt) verifies drafts with one
    multi-token forward and crops the rejected ones: at keep 1.0 every method reproduces plain greedy
    decoding token for token; at keep 0.25 it runs, or (the paper's mode, whose tier copies are the
    whole prompt) refuses a crop into the prompt with an error naming the options."""
    model = _model("llama")
    ids = _assisted_prompt()
    extra = {"assistant_model": model} if mode == "assistant_model" else {"prompt_lookup_num_tokens": 3}
    plain = _greedy(model, ids, DynamicCache())
    name, options = _options(method, _profile("llama") if method == PAPER else None)
    assert torch.equal(_greedy(model, ids, hc.make_cache(model, name, 1.0, **options), **extra), plain)
    if method == "full":
        return
    cache = hc.make_cache(model, name, 0.25, **options)
    try:
        out = _greedy(model, ids, cache, **extra)
    except ValueError as err:
        assert method == PAPER and "assistant_model" in str(err) and "prompt_lookup_num_tokens" in str(err)
        return
    assert out.shape[0] == 1 and ids.shape[1] < out.shape[1] <= ids.shape[1] + 10
    assert cache.get_seq_length() == out.shape[1] - 1


@pytest.mark.parametrize("method", METHODS)
def test_crop_at_keep_one_equals_dynamic_cache(method):
    """``crop(-20)`` into the prompt, then 4 steps: FullKV (every method at keep 1.0) matches ``DynamicCache``."""
    model = _model("qwen2")
    gen = torch.Generator().manual_seed(2)
    ids, steps = torch.randint(3, 128, (2, 120), generator=gen), torch.randint(3, 128, (2, 4), generator=gen)
    name, options = _options(method, _profile("qwen2") if method == PAPER else None)
    logits = []
    for cache in (hc.make_cache(model, name, 1.0, **options), DynamicCache()):
        with torch.no_grad():
            model(ids, **cache_kwargs(cache, model))
        cache.crop(-20)
        assert cache.get_seq_length() == 100
        logits.append(_steps(model, cache, steps))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_dynamic_retrieval_crops_prompt_pages():
    """A crop into the prompt (assisted decoding's rejected first draft): pages holding a cropped position
    leave the dynamic slots and the index for good; decoding goes on retrieving; the accounting counts
    the shorter prompt."""
    model = _model("llama")
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 128, (1, 400), generator=gen)
    cache = hc.make_cache(model, "heterocache", 0.25, sinks=0, window=1, refresh_drift=0.0)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache, model))
    slots = cache.method.runtime.layers[0]
    touched = ((slots.page_positions >= 380).any(-1) & torch.isfinite(slots.base)).clone()
    assert bool(touched.any())
    held_before = slots.resident.sum().item()
    cache.crop(-20)
    assert cache.get_seq_length() == 380 and int(cache.prompt_lengths[0]) == 380
    bytes_before = cache.stats()["retrieval_bytes"]
    _steps(model, cache, torch.randint(3, 128, (1, 6), generator=gen))
    stats = cache.stats()
    assert stats["retrieval_bytes"] > bytes_before  # still retrieving
    for layer in cache.layers:
        slots = cache.method.runtime.layers[layer.layer_idx]
        assert not bool((slots.held_tokens() & (torch.arange(400) >= 380)).any())
        positions = layer.padded()[2]
        stored = positions[(positions >= 0)]
        assert int((stored >= 380).sum()) == 6 * layer.n_kv_heads  # only the 6 decode tokens
    assert cache.method.runtime.layers[0].resident.sum().item() >= held_before - int(touched.sum())
    assert stats["keep_fraction"] == pytest.approx(stats["kept_tokens"] / (380 * 2 * 4))
