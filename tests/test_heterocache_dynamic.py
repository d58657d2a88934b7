"""HeteroCache's default runtime: expected-attention static part + per-step query-driven dynamic slots."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import attend, left_padded_batch, tiny_model, two_hot_regions
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import heterocache as hc
from heterocache.budget import total_budget
from heterocache.cache import HeadwiseCache
from heterocache.hf import cache_kwargs
from heterocache.methods.heterocache import HeteroCache
from heterocache.methods.heterocache.expected import expected_attention
from heterocache.retrieval.index import page_means, summary_tokens


def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """transformers' own rotary embedding of ``x (1, 1, n, D)`` at ``positions (n,)``."""
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    out, _ = apply_rotary_pos_emb(x.double(), x.double(), emb.cos()[None], emb.sin()[None])
    return out


def test_expected_attention_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(3)
    d, length, window, future = 8, 20, 6, 5
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pre = torch.randn(1, 2, length, d, generator=gen)  # 2 query heads, 1 KV head
    queries = torch.cat([_rope(pre[:, h:h + 1], torch.arange(length), inv_freq) for h in range(2)], 1).float()
    keys = torch.randn(1, 1, length, d, generator=gen)
    values = torch.randn(1, 1, length, d, generator=gen)
    valid = torch.ones(1, length, dtype=torch.bool)
    got = expected_attention(queries, keys, values, valid, 0.5, inv_freq, window, future, covariance=True,
                             value_norm=True)
    # direct: mean rotation from explicit rotation matrices of the future positions
    basis = torch.eye(d)[None, None]
    rotations = [_rope(basis, torch.full((d,), p), inv_freq)[0, 0].T for p in range(length, length + future)]
    rbar = torch.stack(rotations).mean(0)  # maps a pre-RoPE vector to its mean future post-RoPE vector
    rows = []
    for h in range(2):
        x = pre[0, h, length - window:].double()
        mu, sigma = x.mean(0), torch.cov(x.T)
        m, s = rbar @ mu, rbar @ sigma @ rbar.T
        k = keys[0, 0].double()
        logits = 0.5 * (k @ m) + 0.5 * 0.25 * torch.einsum("td,de,te->t", k, s, k)
        rows.append(torch.softmax(logits, -1))
    want = torch.stack(rows).mean(0) * values[0, 0].double().norm(dim=-1)
    torch.testing.assert_close(got[0, 0].double(), want, rtol=1e-4, atol=1e-6)


def test_page_means_and_summary_cost():
    keys = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    selectable = torch.tensor([[True, False, True, True, True], [False, False, True, False, False]])
    means, has = page_means(keys, selectable, 2)
    torch.testing.assert_close(means[0], torch.stack([keys[0, 0], (keys[0, 2] + keys[0, 3]) / 2, keys[0, 4]]))
    assert has.tolist() == [[True, True, True], [False, True, False]]
    assert summary_tokens(3000, 16, 2, 4) == 188 * 2 / 8  # 188 pages, bf16 mean key vs fp32 key + value
    assert summary_tokens(3000, 16, 1, 4) == (188 + 4) / 8  # int8 means + an fp32 scale per channel


def test_auto_index_page_and_rank_follow_keep():
    method = HeteroCache()  # int8 index of an fp32 cache, head_dim 64
    assert [method.resolved_index(k) for k in (0.5, 0.25, 0.1)] == ["sketch", "sketch", "pages"]
    assert [method.resolved_page(k) for k in (0.5, 0.25, 0.1, 0.05, 0.01)] == [8, 8, 8, 16, 64]
    assert [method.resolved_rank(k) for k in (0.5, 0.25, 0.1, 0.05)] == [16, 16, 8, 4]
    pages = HeteroCache(index="pages")  # int8 page means: 1 / (8 * page) of the tokens' bytes
    assert [pages.resolved_page(k) for k in (0.5, 0.25, 0.1)] == [4, 4, 8]
    bf16 = HeteroCache(index="pages", summary_dtype="bfloat16")
    assert [bf16.resolved_page(k) for k in (0.5, 0.25, 0.1)] == [4, 8, 16]
    assert HeteroCache(page=4).resolved_page(0.1) == 4
    half = HeteroCache(index="pages")
    half.kv_bytes = 2  # a bf16 / fp16 cache (bind_model reads it from the model): the pages of an fp32 one
    assert [half.resolved_page(k) for k in (0.5, 0.25, 0.1, 0.05)] == [4, 4, 8, 16]
    cache = hc.make_cache(tiny_model().to(torch.bfloat16), "heterocache", 0.1)
    assert cache.method.kv_bytes == 2 and cache.method.resolved_page(0.1) == 8
    with pytest.raises(ValueError, match="page='big' must be 'auto' or an integer"):
        hc.make_cache(tiny_model(), "heterocache", 0.5, page="big")


def test_page_layout_cuts_selectable_tokens_into_pages():
    from heterocache.retrieval.slots import page_layout

    selectable = torch.tensor([[True, True, False, True, True, True, True, False, True],
                               [True, True, True, False, False, False, False, False, False]])
    scores = torch.arange(9, dtype=torch.float32).repeat(2, 1)
    scores[0, 4] = 50.0  # the best selectable token of row 0: kept statically (7 tokens, pages of 3)
    positions, real, extra = page_layout(selectable, scores, 3)
    assert positions[0].tolist() == [[0, 1, 3], [5, 6, 8]] and extra[0].nonzero().flatten().tolist() == [4]
    assert positions[1, 0].tolist() == [0, 1, 2] and real.tolist() == [[True, True], [True, False]]
    assert not extra[1].any()
    # no spare page to pay for it: the lowest-scored remainder token is left out instead
    positions, real, extra = page_layout(selectable, scores, 3, spare=torch.tensor([False, True]))
    assert positions[0].tolist() == [[1, 3, 4], [5, 6, 8]] and not extra.any()


def _dynamic_setup(**options):
    """One layer, 1 KV head; keys with hot regions A (10..13) and B (40..43)."""
    d, length = 8, 64
    method = HeteroCache(scorer="votes", window=2, sinks=0, page=4, dynamic_share=0.5, summary_dtype="float32",
                         **options)
    cache = HeadwiseCache(method, 24 / 64, n_layers=1, n_kv_heads=1, head_dim=d,
                          geometry={"n_layers": 1, "n_kv_heads": 1, "head_dim": d})
    module, keys, values, u, v = two_hot_regions(1, d, length)
    return cache, module, keys, values, u, v



def test_dynamic_slots_follow_the_query_and_are_fetched_exactly():
    cache, module, keys, values, u, v = _dynamic_setup()
    attend(cache, module, keys, values, u)  # prefill: 24 tokens - 8 for 16 fp32 page means = 8 static + 8 dynamic
    _, _, positions, lengths = cache.layers[0].padded()
    assert lengths.tolist() == [[16]]
    new_k, new_v = torch.zeros((1, 1, 1, 8)), torch.zeros((1, 1, 1, 8))
    attend(cache, module, new_k, new_v, v)  # the first decode query looks at region B
    stored_k, stored_v, positions, lengths = cache.layers[0].padded()
    held = positions[0, 0, : lengths[0, 0]].tolist()
    assert set(range(40, 44)) <= set(held)  # the dynamic slots now hold region B, fetched before attention
    for i, position in enumerate(held[:-1]):  # every prompt entry is the original K/V, bit-exact
        assert torch.equal(stored_k[0, 0, i], keys[0, 0, position]) and torch.equal(stored_v[0, 0, i], values[0, 0, position])
    assert held[-1] == 64  # the decoded token is appended after the prompt part
    stats = cache.stats()
    assert stats["retrieval_refreshes"] == 1 and stats["retrieval_tokens"] >= 4
    # the host tier holds the head's 56 selectable prompt tokens (64 - 8 static) as 14 pages of 4
    assert stats["host_bytes"] == 2 * 56 * 8 * 4
    assert stats["summary_bytes"] == 14 * 8 * 4 and stats["device_bytes"] >= stats["summary_bytes"]
    attend(cache, module, new_k, new_v, u)  # back to region A: swapped again
    _, _, positions, lengths = cache.layers[0].padded()
    assert set(range(10, 14)) <= set(positions[0, 0, : lengths[0, 0]].tolist())


def test_dynamic_budget_pays_for_the_summaries_and_keep_one_is_exact():
    model = tiny_model("llama", layers=2, heads=8, kv_heads=4)
    ids, mask = left_padded_batch([200, 150], seed=4)
    cache = hc.make_cache(model, "heterocache", 0.5, window=8, sinks=2, page=16)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), max_new_tokens=6,
                             min_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 6
    kept = torch.stack([layer.kept_prompt_tokens() for layer in cache.layers])  # (L, B, H)
    for row, n in enumerate([200, 150]):
        cost = math.ceil(summary_tokens(n, 16, 1, 4) * 2 * 4)  # 2 layers x 4 heads retrieve, int8 means
        # a head's remainder tokens (fewer than a page) kept statically cost its layer a page of slots:
        # fewer than a page per head stays unused
        assert total_budget(0.5, n, 2, 4) - cost - 16 * 8 < int(kept[:, row].sum()) <= total_budget(0.5, n, 2, 4) - cost
    stats = cache.stats()
    assert stats["retrieval_refreshes"] == 2 * 5  # every layer, every decode step after the first token
    # padding is never fetched: row 1's first 50 slots stay out of every head
    for layer in cache.layers:
        positions = layer.padded()[2][1]
        assert not ((positions >= 0) & (positions < 50)).any()
    full = hc.make_cache(model, "heterocache", 1.0)
    ref = hc.make_cache(model, "full", 1.0)
    with torch.no_grad():
        a = model.generate(ids, attention_mask=mask, **cache_kwargs(full, model), max_new_tokens=6, do_sample=False)
        b = model.generate(ids, attention_mask=mask, **cache_kwargs(ref, model), max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("option,value,match", [("dynamic_share", 1.5, "dynamic_share=1.5"), ("page", 0, "page=0"),
                                                ("summary_dtype", "float8", "summary_dtype='float8'"),
                                                ("scorer", "oracle", "scorer='oracle'"), ("stick", -1.0, "stick=-1.0"),
                                                ("stick", "high", "stick='high' of method 'heterocache' must be of type float"), ("refill", "fast", "refill='fast'"),
                                                ("page_score", "mean", "page_score='mean'")])
def test_dynamic_options_are_validated(option, value, match):
    with pytest.raises(ValueError, match=match):
        hc.make_cache(tiny_model(), "heterocache", 0.5, **{option: value})


@pytest.mark.parametrize("lse", [True, False])
def test_full_rank_sketch_selects_the_exact_top_pages(lse):
    """With rank = D the sketch is exact: a page scores as the log-sum-exp (or the max) of its tokens'
    shifted logits."""
    from heterocache.methods.heterocache.dynamic import choose, unit_scores
    from heterocache.retrieval.index import SummaryIndex, key_sketch
    from heterocache.retrieval.slots import PagedSlots

    gen = torch.Generator().manual_seed(5)
    n, pages, page, d, width = 2, 10, 4, 8, 3
    keys = torch.randn(n, pages * page, d, generator=gen)
    queries = torch.randn(n, 3, d, generator=gen)
    sketch, basis = key_sketch(keys, torch.ones(n, pages * page, dtype=torch.bool), d)  # rank = D: exact
    base = torch.zeros(n, pages)
    base[:, 0] = float("-inf")  # a padding page
    summaries = sketch.view(n, pages, page, d).transpose(1, 2).reshape(n, -1, d).transpose(1, 2).contiguous()
    index = SummaryIndex("sketch", summaries, basis * 0.3, None, 0.3, page, page_lse=lse, channels=d)  # unit-major
    slots = PagedSlots(seq=[0, 1], resident=torch.zeros(n, pages, dtype=torch.bool), counts=torch.full((n,), width),
                       width=width, base=base, length=pages * page, unit=page, scaling=0.3, index=index,
                       page_positions=torch.arange(pages * page).view(1, pages, page).expand(n, -1, -1))
    chosen = choose(slots, queries, 0.0)
    logits = ((queries @ keys.transpose(1, 2)) * 0.3).view(n, 3, pages, page)  # (n, 3, P, page)
    logits = (logits.logsumexp(-1) if lse else logits.amax(-1)) + base[:, None]
    logits = logits - logits.amax(-1, keepdim=True)
    torch.testing.assert_close(unit_scores(slots, queries, 0.0), logits.amax(1), rtol=1e-4, atol=1e-4)
    want = logits.amax(1).topk(width, dim=-1).indices
    assert [sorted(r) for r in chosen.tolist()] == [sorted(r) for r in want.tolist()]


def test_sketch_index_is_paid_from_the_budget():
    from heterocache.retrieval.index import sketch_tokens

    model = tiny_model("llama", layers=2, heads=8, kv_heads=4)
    ids, mask = left_padded_batch([200], seed=4)
    cache = hc.make_cache(model, "heterocache", 0.5, window=8, sinks=2, index="sketch", rank=4)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), max_new_tokens=3, do_sample=False)
    kept = sum(int(layer.kept_prompt_tokens().sum()) for layer in cache.layers)
    paid = total_budget(0.5, 200, 2, 4) - math.ceil(sketch_tokens(200, 4, 16, 1, 4) * 8)  # int8 sketch
    page = HeteroCache().resolved_page(0.5)
    assert paid - page * 8 < kept <= paid  # fewer than a page per head unused (remainder tokens)
    stats = cache.stats()
    # per head: int8 sketch of its paged (non-static) tokens x rank 4, fp32 basis (16 x 4), fp32 scale (4),
    # within what the budget paid for (every prompt token sketched)
    sketched = sum(slots.index.summaries.numel() for slots in cache.method.runtime.layers.values())  # int8 bytes
    assert stats["summary_bytes"] == sketched + 8 * (16 * 4 * 4 + 4 * 4) <= 8 * (200 * 4 + 16 * 4 * 4 + 4 * 4)
    assert stats["retrieval_refreshes"] == 2 * 2


@pytest.mark.parametrize("index", ["pages", "sketch"])
def test_block_swap_matches_the_token_swap(index):
    """The fast path (block layout: whole units replaced in unit slots) and the reference (token by
    token into the slots freed) attend over the same tokens, fetched from the tier."""
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(3))
    logits = {}
    for blocks in (True, False):
        cache = hc.make_cache(model, "heterocache", 0.25, index=index, rank=2, window=8, sinks=2,
                              refill="torch")  # the PyTorch block path (the C one: tests/test_native.py)
        rows = []
        runtime = cache.method.runtime
        runtime.allow_blocks = blocks  # before the prefill: its end lays out the slots (after_store)
        with torch.no_grad():
            out = model(ids, **cache_kwargs(cache, model))
            for _ in range(24):  # past the prefill headroom: the buckets grow, unit-aligned
                token = out.logits[:, -1:].argmax(-1)
                out = model(token, **cache_kwargs(cache, model))
                rows.append(out.logits[:, -1])
        # equal heads within a layer (the last one may carry the remainder: it swaps)
        assert [slots.blocks for slots in runtime.layers.values()] == [blocks and slots.uniform
                                                                       for slots in runtime.layers.values()]
        assert runtime.layers[0].uniform
        if blocks:  # unit slots are whole rows of a (n * capacity / unit, unit * D) view
            bucket = cache.layers[0].buckets[0]
            assert bucket.capacity % runtime.layers[0].unit == 0 and bucket.capacity > bucket.stored_len + 9
        held = [set(layer.padded()[2][0, h, : layer.padded()[3][0, h]].tolist()) for layer in cache.layers
                for h in range(2)]
        logits[blocks] = (torch.cat(rows), held)
    torch.testing.assert_close(logits[True][0], logits[False][0], rtol=1e-5, atol=1e-5)
    assert logits[True][1] == logits[False][1]  # the same positions held by every head


def test_int8_summaries_are_scaled_per_channel():
    """Channels of any magnitude keep their shape: each is rounded on its own scale (max / 127)."""
    from heterocache.retrieval.index import SummaryIndex, quantize

    summary = torch.randn(2, 10, 3, generator=torch.Generator().manual_seed(0))
    summary[:, :, 0] *= 5000.0  # one huge channel
    stored, scale = quantize(summary, torch.int8)
    assert stored.dtype == torch.int8 and stored.shape == (2, 3, 10) and scale.shape == (2, 1, 3)
    restored = stored.float().transpose(1, 2) * scale
    step = summary.abs().amax(1, keepdim=True) / 127  # the channel's rounding step
    assert bool(((restored - summary).abs() <= step / 2 + 1e-6 * step).all())
    index = SummaryIndex("pages", stored, None, scale, 1.0, 4, channels=3)
    assert index.nbytes() == 2 * 3 * 10 + 2 * 3 * 4  # int8 values + fp32 scales


def test_block_layout_stays_unit_aligned_when_buckets_grow():
    """Whatever capacity the prefill left (a unit multiple or not), growth past the headroom keeps it
    a multiple of the unit, so the block swap's (n * capacity / unit, unit * D) view stays valid."""
    model = tiny_model("llama", layers=1, heads=4, kv_heads=2)
    for length in range(296, 304):
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
        cache = hc.make_cache(model, "heterocache", 0.25, page=4, window=8, sinks=2)
        with torch.no_grad():
            out = model(ids, **cache_kwargs(cache, model))
            for _ in range(24):
                out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(cache, model))
        bucket = cache.layers[0].buckets[0]
        # every later growth rounds to the bucket's alignment (a unit multiple, even when the prefill
        # capacity happened to be one already)
        assert cache.method.runtime.layers[0].blocks and bucket.capacity % 4 == 0 and bucket.align % 4 == 0, length


def test_every_tier_serves_the_same_pages(tmp_path):
    """Host (read in place), disk (memory-mapped gather) and the device emulation fetch the same
    bytes: the decode logits agree exactly."""
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(8))
    logits = {}
    for offload in ("host", "disk", "none"):
        options = {"offload_dir": str(tmp_path)} if offload == "disk" else {}
        cache = hc.make_cache(model, "heterocache", 0.25, offload=offload, window=8, sinks=2, **options)
        rows = []
        with torch.no_grad():
            out = model(ids, **cache_kwargs(cache, model))
            for _ in range(5):
                out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(cache, model))
                rows.append(out.logits[:, -1])
        assert cache.stats()["retrieval_tokens"] > 0
        logits[offload] = torch.cat(rows)
        cache.close()
    assert torch.equal(logits["host"], logits["disk"]) and torch.equal(logits["host"], logits["none"])


@pytest.mark.parametrize("refill", ["auto", "torch"])
def test_drift_gate_keeps_the_pages_while_the_query_stays_close(refill):
    """``refresh_drift``: a sequence refills only when its projected queries moved more than that
    (relative distance) since its last refill. Query v, then u (orthogonal: distance sqrt 2): with 1.0
    the step refills (other pages come in), with 2.0 it keeps the pages it holds."""
    for drift, refills in ((1.0, True), (2.0, False)):
        cache, module, keys, values, u, v = _dynamic_setup(refresh_drift=drift, refill=refill)
        attend(cache, module, keys, values, u)
        new_k, new_v = torch.zeros((1, 1, 1, 8)), torch.zeros((1, 1, 1, 8))
        attend(cache, module, new_k, new_v, v)  # the first decode step always refills: region B
        before = set(cache.layers[0].padded()[2][0, 0].tolist()) - {64}
        moved = cache.stats()["retrieval_tokens"]
        attend(cache, module, new_k, new_v, u)
        after = set(cache.layers[0].padded()[2][0, 0].tolist()) - {64, 65}
        assert set(range(40, 44)) <= before
        assert (after != before) == refills
        assert (cache.stats()["retrieval_tokens"] > moved) == refills
        attend(cache, module, new_k, new_v, u)  # the same query again: within any drift, nothing moves
        stats = cache.stats()
        assert stats["retrieval_checked"] == 3
        assert stats["retrieval_skipped"] == (1 if refills else 2)
        assert (cache.method.runtime.layers[0].native is not None) == (refill == "auto")  # the C gate, and its reference


def test_refresh_drift_must_be_non_negative():
    model = tiny_model("llama", layers=1, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="refresh_drift"):
        hc.make_cache(model, "heterocache", 0.25, refresh_drift=-0.1)
    assert hc.make_cache(model, "heterocache", 0.25).method.refresh_drift == 0.3  # the measured default
