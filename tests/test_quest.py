"""Quest (methods/quest.py): the min/max page bound, its selection, budgets with the metadata paid."""

from __future__ import annotations

import math

import torch
from conftest import tiny_model

import heterocache as hc
from heterocache.budget import total_budget
from heterocache.hf import cache_kwargs
from heterocache.methods.quest import page_bounds


def test_bound_is_never_below_the_best_logit_of_its_page():
    gen = torch.Generator().manual_seed(0)
    n, pages, page, d = 3, 20, 16, 32
    keys = torch.randn(n, pages * page, d, generator=gen)
    queries = torch.randn(n, 5, d, generator=gen)
    index = page_bounds(keys, page)
    q = queries[:, :, None, :]  # (n, R, 1, D): the bound per row, by its definition
    bound = torch.maximum(q * index.maxs[:, None], q * index.mins[:, None]).sum(-1)  # (n, R, P)
    best = (queries @ keys.transpose(1, 2)).view(n, 5, pages, page).amax(-1)
    assert bool((bound >= best - 1e-5).all())
    torch.testing.assert_close(index.page_scores(queries, torch.zeros(n, pages)), bound.amax(1), rtol=1e-5, atol=1e-5)


def test_separated_pages_select_the_true_best_page():
    """One page per row holds a key along the query; the others are small noise: its bound is the top."""
    gen = torch.Generator().manual_seed(1)
    n, pages, page, d = 2, 12, 16, 8
    keys = 0.05 * torch.randn(n, pages * page, d, generator=gen)
    target = [3, 9]
    for row, p in enumerate(target):
        keys[row, p * page + 5, 0] = 4.0
    queries = torch.zeros(n, 2, d)
    queries[:, :, 0] = 1.0
    base = torch.zeros(n, pages)
    scores = page_bounds(keys, page).page_scores(queries, base)
    assert scores.argmax(-1).tolist() == target
    base[0, 3] = float("-inf")  # a retired page is never chosen
    assert page_bounds(keys, page).page_scores(queries, base)[0].argmax().item() != 3


def test_budgets_pay_the_metadata_and_keep_the_dense_layers():
    model = tiny_model("llama", layers=6, heads=8, kv_heads=4)
    ids = torch.randint(3, 128, (1, 960), generator=torch.Generator().manual_seed(2))
    cache = hc.make_cache(model, "quest", 0.5)
    with torch.no_grad():
        model.generate(ids, **cache_kwargs(cache, model), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    budgets, roles = cache.method.plan(0.5, 960)
    assert roles == ["dense", "dense", "pages", "pages", "pages", "pages"]
    assert budgets[0] == budgets[1] == [960] * 4
    kept = torch.stack([layer.kept_prompt_tokens()[0] for layer in cache.layers])  # (L, H)
    assert kept[:2].eq(960).all()
    total = total_budget(0.5, 960, 6, 4)
    assert sum(map(sum, budgets)) == total
    meta_per_head = math.ceil(960 / 16)  # min + max key per 16-token page: 2 D of the 2 D per token
    stats = cache.stats()
    assert stats["index_bytes"] == 4 * 4 * 60 * 2 * 16 * 4  # 4 layers x 4 heads x 60 pages x (min, max) x D fp32
    assert int(kept.sum()) + 16 * meta_per_head <= total
    assert int(kept[2:].sum()) > (total - 2 * 4 * 960) - 16 * (meta_per_head + 2 * 16)
    assert stats["retrieval_bytes"] > 0 and stats["host_bytes"] > 0


def test_held_pages_are_the_top_bounds_of_the_step_query():
    """After a decode step each retrieving head holds the pages with the highest bound for that step's
    queries (max over its group), computed here from the tier's keys."""
    model = tiny_model("llama", layers=3, heads=8, kv_heads=2)
    ids = torch.randint(3, 128, (1, 640), generator=torch.Generator().manual_seed(3))
    cache = hc.make_cache(model, "quest", 0.3, dense_layers=1)
    captured = {}
    original = cache.method.wanted

    def spy(layer, slots, queries):
        captured[layer.layer_idx] = queries.clone()
        return original(layer, slots, queries)

    cache.method.wanted = spy
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache, model))
        model(out.logits[:, -1:].argmax(-1), **cache_kwargs(cache, model))
    for layer_idx, slots in cache.method.engine.layers.items():
        keys, _ = cache.method.engine.tier.layers[layer_idx]  # (n, P * 16, D) page layout
        queries = captured[layer_idx].reshape(2, 4, -1)  # (Hkv, group, D)
        bound = page_bounds(keys, 16).page_scores(queries, slots.base)
        want = bound.topk(int(slots.counts[0]), dim=-1).indices.sort().values
        held = torch.stack([torch.nonzero(r).flatten() for r in slots.resident])
        assert torch.equal(held, want)


def test_device_placement_keeps_everything_on_the_device_and_pays_no_metadata():
    model = tiny_model("llama", layers=4, heads=8, kv_heads=4)
    ids = torch.randint(3, 128, (1, 640), generator=torch.Generator().manual_seed(4))
    stats = {}
    for placement in ("host", "device"):
        cache = hc.make_cache(model, "quest", 0.25, placement=placement, dense_layers=0)
        with torch.no_grad():
            model.generate(ids, **cache_kwargs(cache, model), max_new_tokens=3, min_new_tokens=3, do_sample=False)
        stats[placement] = cache.stats()
    assert stats["device"]["host_bytes"] == 0 and stats["host"]["host_bytes"] > 0
    assert stats["device"]["device_tier_bytes"] == stats["host"]["host_bytes"]  # the same pages, on the device
    assert stats["device"]["device_bytes"] > stats["device"]["device_tier_bytes"]  # memory is not saved
    assert stats["device"]["kept_tokens"] > stats["host"]["kept_tokens"]  # its metadata is not paid from keep
