"""HeteroCache runtime: budgets, static selection, constructed drift, async == sync, tiers."""

from __future__ import annotations

import pytest
import torch
from conftest import attend, left_padded_batch, tiny_model, two_hot_regions
from transformers import DynamicCache

import heterocache as hc
from heterocache.budget import allocate
from heterocache.cache import HeadwiseCache
from heterocache.hf import cache_kwargs
from heterocache.methods.heterocache import HeteroCache
from heterocache.methods.scoring import select_with_forced
from heterocache.methods.snapkv import window_votes
from heterocache.profiling.profile import HeadProfile, HeadRecord, model_fingerprint
from heterocache.retrieval.tiers import DiskTier, MemoryTier

ROLES = [["pivot", "satellite", "satellite", "anchor"], ["volatile", "pivot", "satellite", "anchor"]]


def make_profile(roles, fingerprint="test", head_dim=16, pivot_of=None):
    heads = []
    for layer, row in enumerate(roles):
        records = []
        for head, role in enumerate(row):
            temporal = "volatile" if role == "volatile" else "anchor"
            cluster = role if role in ("pivot", "satellite") else None
            pivot = (pivot_of or {}).get(layer, row.index("pivot") if "pivot" in row else None) \
                if role == "satellite" else None
            weight = None if role in ("pivot", "volatile") else 1.0 + 0.1 * head
            records.append(HeadRecord(layer, head, 0.3 + 0.1 * head, (temporal, cluster), pivot, weight))
        heads.append(records)
    model = {"name": "tiny", "n_layers": len(roles), "n_kv_heads": len(roles[0]), "head_dim": head_dim,
             "fingerprint": fingerprint}
    return HeadProfile(model=model, settings={}, heads=heads)


def test_allocation_by_hand():
    profile = make_profile(ROLES)
    budgets, full = allocate(profile, 0.5, 200, max_full_share=1.0)
    assert full == [[True, False, False, False], [True, True, False, False]]
    # 800 total, 600 for the three full heads; 200 shared by weights 1.1, 1.2, 1.3, 1.2, 1.3
    assert budgets == [[200, 36, 39, 43], [200, 200, 39, 43]]
    # at keep 0.25 the full heads cannot all stay: the most stable volatile head goes first
    budgets, full = allocate(profile, 0.25, 200, max_full_share=1.0)
    assert sum(map(sum, budgets)) == 400
    assert full[1][0] is False and sum(map(sum, full)) == 1
    # the share cap demotes further so compressed heads keep a real budget
    _, capped = allocate(profile, 0.5, 200, max_full_share=0.5)
    assert sum(map(sum, capped)) == 2
    # a total below sinks + 1 per head (short prompt, small keep): every head compressed, the floor cut to fit
    budgets, full = allocate(profile, 0.01, 200)  # 16 tokens for 8 heads
    assert sum(map(sum, budgets)) == 16 and not any(map(any, full))
    assert min(min(row) for row in budgets) == 2


def test_keep_one_equals_full_and_static_selection_by_hand():
    model = tiny_model("llama", layers=2, heads=8, kv_heads=4)
    profile = make_profile(ROLES, model_fingerprint(model))
    ids, mask = left_padded_batch([200], seed=4)
    model.set_attn_implementation("sdpa")
    ref_cache = DynamicCache()
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **cache_kwargs(ref_cache), max_new_tokens=12, do_sample=False)
    cache = hc.make_cache(model, "heterocache", 1.0, profile=profile)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=12, do_sample=False)
    assert torch.equal(ref, out)

    cache = hc.make_cache(model, "heterocache", 0.5, profile=profile, retrieval="off", max_full_share=1.0)
    captured = {}
    original = HeteroCache.select

    def spy(self, ctx):
        captured[ctx.layer_idx] = ctx
        return original(self, ctx)

    HeteroCache.select = spy
    try:
        with torch.no_grad():
            model(ids, **cache_kwargs(cache))
    finally:
        HeteroCache.select = original
    expected_budget = [[200, 36, 39, 43], [200, 200, 39, 43]]
    for layer in range(2):
        _, _, positions, lengths = cache.layers[layer].padded()
        assert lengths[0].tolist() == expected_budget[layer]
        ctx = captured[layer]
        scores = window_votes(ctx, 32, 7, "max", "mean")
        budget = torch.tensor([expected_budget[layer]])
        chosen = select_with_forced(scores, ctx.valid, budget, 4, 32)
        for head in range(4):
            want = torch.nonzero(chosen[0, head]).flatten().tolist()
            if expected_budget[layer][head] == 200:
                want = list(range(200))
            assert positions[0, head, : lengths[0, head]].tolist() == want
    assert cache.stats()["keep_fraction"] == pytest.approx(0.5)


def _drift_setup(retrieval="sync", offload="host", **options):
    """One layer, KV head 0 = pivot, head 1 = its satellite; keys with two hot regions A and B."""
    d, length = 8, 64
    profile = make_profile([["pivot", "satellite"]], head_dim=d)
    method = HeteroCache(profile=profile, steps=1, window=1, sinks=0, retrieval=retrieval, offload=offload,
                         max_full_share=1.0, drift_threshold=0.5, **options)
    cache = HeadwiseCache(method, 72 / 128, n_layers=1, n_kv_heads=2, head_dim=d,
                          geometry={"n_layers": 1, "n_kv_heads": 2, "head_dim": d})
    cache.model_config = None
    module, keys, values, u, v = two_hot_regions(2, d, length)
    return cache, module, keys, values, u, v



def test_constructed_drift_triggers_and_refreshes_region_b():
    cache, module, keys, values, u, v = _drift_setup()
    attend(cache, module, keys, values, u)  # prefill: attention on region A
    _, _, positions, lengths = cache.layers[0].padded()
    assert lengths.tolist() == [[64, 8]]
    assert set(positions[0, 1, :8].tolist()) <= set(range(7, 17)) | {63}  # max-pool kernel 7 around 10..13
    new_k, new_v = torch.zeros((1, 2, 1, 8)), torch.zeros((1, 2, 1, 8))
    attend(cache, module, new_k, new_v, u)  # step 1: still region A
    assert cache.stats()["retrieval_triggers"] == 0 and cache.stats()["retrieval_checks"] == 1
    attend(cache, module, new_k, new_v, v)  # step 2: attention moves to region B -> trigger
    assert cache.stats()["retrieval_triggers"] == 1
    _, _, positions, _ = cache.layers[0].padded()
    assert set(positions[0, 1, :8].tolist()) <= set(range(7, 17)) | {63}  # max-pool kernel 7 around 10..13  # applied only at the next step
    attend(cache, module, new_k, new_v, v)  # step 3: the refreshed set is swapped in first
    _, _, positions, lengths = cache.layers[0].padded()
    kept = positions[0, 1, :8].tolist()
    assert set(range(40, 44)) <= set(kept) and set(kept) <= set(range(38, 46)) | {63}
    assert positions[0, 1, 8:10].tolist() == [64, 65]  # generated tokens stay
    assert lengths[0, 1] == 11
    assert cache.stats()["retrieval_tokens"] == 8


def test_disk_tier_round_trip_and_cleanup(tmp_path):
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn((3, 50, 4), generator=gen), torch.randn((3, 50, 4), generator=gen)
    tier = DiskTier(tmp_path / "tier")
    tier.put(2, keys, values)
    rows, pos = torch.tensor([2, 0]), torch.tensor([[5, 7, 49], [0, 1, 2]])
    got_k, got_v = tier.gather(2, rows, pos)
    assert torch.equal(got_k, keys[rows[:, None], pos]) and torch.equal(got_v, values[rows[:, None], pos])
    assert tier.nbytes() > 2 * keys.nbytes
    ref_k, _ = MemoryTier(torch.device("cpu")).put(0, keys, values) or (None, None)
    tier.close()
    assert list((tmp_path / "tier").iterdir()) == []


def test_disk_offload_in_cache_files_removed_on_reset(tmp_path):
    cache, module, keys, values, u, v = _drift_setup(offload="disk", offload_dir=str(tmp_path))
    attend(cache, module, keys, values, u)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert cache.stats()["disk_bytes"] > 0 and cache.stats()["host_bytes"] == 0
    cache.reset()
    assert list(tmp_path.glob("*.safetensors")) == []


def test_unwritable_offload_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="offload_dir"):
        DiskTier(blocker / "sub")


def test_async_equals_sync_repeated():
    model = tiny_model("qwen2", layers=2, heads=8, kv_heads=4)
    profile = make_profile(ROLES, model_fingerprint(model))
    ids, mask = left_padded_batch([90, 60], seed=7)
    options = dict(profile=profile, steps=2, drift_threshold=0.99, window=8, max_full_share=1.0)

    def run(mode):
        cache = hc.make_cache(model, "heterocache", 0.5, retrieval=mode, **options)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=8,
                                 min_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
        stats = cache.stats()
        cache.close()
        return out, stats

    sync, sync_stats = run("sync")
    assert sync_stats["retrieval_triggers"] > 0
    for _ in range(50):
        out, stats = run("async")
        assert torch.equal(out.sequences, sync.sequences)
        for a, b in zip(out.scores, sync.scores):
            torch.testing.assert_close(a, b)
        assert stats["retrieval_triggers"] == sync_stats["retrieval_triggers"]
        assert stats["retrieval_tokens"] == sync_stats["retrieval_tokens"]


def test_profile_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="profile="):  # the paper's mechanism needs the head profile
        hc.make_cache(model, "heterocache", 0.5, retrieval="async")
    hc.make_cache(model, "heterocache", 0.5).close()  # the default (dynamic retrieval) needs none
    profile = make_profile([["pivot", "satellite"]] * 2, model_fingerprint(model))
    with pytest.raises(ValueError, match="another model"):
        hc.make_cache(tiny_model(layers=3), "heterocache", 0.5, profile=profile)
    with pytest.raises(FileNotFoundError):
        hc.make_cache(model, "heterocache", 0.5, profile="/nonexistent/profile.json")
