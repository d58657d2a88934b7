"""ShadowKV (methods/shadowkv/): low-rank key rebuild with RoPE, outlier chunks, chunk scoring, budgets
with the factors and landmarks paid, values-only transfers, decode through the real cache."""

from __future__ import annotations

import math
import types

import pytest
import torch
from conftest import left_padded_batch, tiny_model
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import heterocache as hc
from heterocache.budget import total_budget
from heterocache.hf import cache_kwargs
from heterocache.methods.base import PrefillContext
from heterocache.methods.shadowkv import ShadowKV
from heterocache.methods.shadowkv.index import LowRankIndex, min_cosine, rotate
from heterocache.methods.shadowkv.method import Plan


def _inv_freq(d: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float) / d))


def _method(n_kv: int, d: int, **options) -> ShadowKV:
    method = ShadowKV(**options)
    method.inv_freq = _inv_freq(d)
    method.setup(types.SimpleNamespace(n_kv_heads=n_kv, layer_windows=[None], head_dim=d))
    return method


def _context(keys: torch.Tensor, valid: torch.Tensor, budget: int, keep: float, group: int = 1) -> PrefillContext:
    b, h, length, d = keys.shape
    gen = torch.Generator().manual_seed(7)
    return PrefillContext(layer_idx=0, n_layers=1, queries=torch.randn(b, h * group, length, d, generator=gen),
                          keys=keys, values=torch.randn(b, h, length, d, generator=gen), valid=valid,
                          prompt_lengths=valid.sum(-1), scaling=d ** -0.5, keep=keep,
                          budget=torch.full((b, h), budget))


def _plan_for(method: ShadowKV, keep: float, length: int, rank: int, chunk: int, outliers: int) -> None:
    """Serve prompts of ``length`` with retrieval at the given settings (bypassing the budget plan)."""
    local = length - (length // chunk - method.local_chunks) * chunk
    method.plans[(keep, length)] = Plan([[0] * method.n_kv_heads], ["retrieve"], rank, chunk, outliers, local)


def _rotary_keys(pre: torch.Tensor, mask: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Post-RoPE keys as transformers makes them, at ``position_ids = cumsum(mask) - 1`` (generate's rule)."""
    d = pre.shape[-1]
    config = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, head_dim=d, max_position_embeddings=512)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = LlamaRotaryEmbedding(config)(pre, positions)
    _, keys = apply_rotary_pos_emb(pre, pre, cos * scaling, sin * scaling)
    return keys


@pytest.mark.parametrize("attention_scaling", [1.0, 1.3])
def test_full_rank_rebuild_equals_the_keys_at_left_padded_positions(attention_scaling):
    """Rank Hkv * D: every paged chunk's rebuilt key equals the post-RoPE key the attention used (RoPE at
    the row's rotary position ``t - pad``; a RoPE attention scaling stays in the factors)."""
    gen = torch.Generator().manual_seed(0)
    b, h, length, d, chunk = 2, 2, 72, 8, 4
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, :9] = False  # row 1: 9 pads, 63 tokens
    keys = _rotary_keys(torch.randn(b, h, length, d, generator=gen), mask, attention_scaling)
    method = _method(h, d)
    for n in (72, 63):
        _plan_for(method, 0.5, n, h * d, chunk, 1)
    ctx = _context(keys, mask, budget=40, keep=0.5)
    kept = method.select(ctx)
    slots = method.engine.layers[0]
    index = slots.index
    assert index.sv.shape == (b * h, h * d, d) and index.u.shape == (72 + 63, h * d)
    rows, units = torch.nonzero(slots.real_pages(), as_tuple=True)
    rebuilt = index.rebuild_keys(rows, units)  # (m, chunk, D)
    positions = slots.page_positions[rows, units]
    exact = keys.reshape(b * h, length, d)[rows[:, None], positions]
    torch.testing.assert_close(rebuilt, exact, rtol=1e-4, atol=1e-4)
    assert not bool(kept[1, :, :9].any())  # padding never kept
    assert int(rows.eq(2).sum()) > 0  # row 1's sequences were rebuilt too


def test_rotation_matches_transformers_and_inverts():
    gen = torch.Generator().manual_seed(1)
    pre = torch.randn(1, 2, 30, 16, generator=gen)
    keys = _rotary_keys(pre, torch.ones(1, 30, dtype=torch.bool))
    positions = torch.arange(30)
    torch.testing.assert_close(rotate(pre, positions, _inv_freq(16)), keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotate(keys, positions, _inv_freq(16), inverse=True), pre, rtol=1e-5, atol=1e-5)


def test_rotary_positions_are_the_models_with_left_padding():
    """Layer 0's pre-RoPE keys depend on the token only: un-rotated at ``slot - pad`` they agree between a
    row and the same tokens left padded, so the model rotated them there (generate's positions)."""
    model = tiny_model("llama", layers=1, heads=4, kv_heads=2)
    prompt = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(2))
    pad = 11
    ids = torch.cat([prompt, torch.cat([torch.zeros(1, pad, dtype=torch.long), prompt[:, :-pad]], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    cache = hc.make_cache(model, "shadowkv", 0.5)
    captured = {}
    original = cache.method.select

    def spy(ctx):
        captured["keys"] = ctx.keys.clone()
        return original(ctx)

    cache.method.select = spy
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), max_new_tokens=1, do_sample=False)
    keys, inv_freq = captured["keys"], cache.method.inv_freq
    plain = rotate(keys[0, :, : 60 - pad], torch.arange(60 - pad), inv_freq, inverse=True)
    padded = rotate(keys[1, :, pad:], torch.arange(60 - pad), inv_freq, inverse=True)
    torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-4)


def test_min_cosine_by_hand():
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [2.0, 0.0]]])  # (H=1, 2 chunks of 2, D=2)
    means, low = min_cosine(keys, 2)
    torch.testing.assert_close(means, torch.tensor([[[0.5, 0.5], [2.0, 0.0]]]))
    torch.testing.assert_close(low, torch.tensor([[1 / math.sqrt(2), 1.0]]))


def test_outlier_rule_keeps_the_constructed_outlier_chunks_exact():
    """12 chunks of 4 per head, the last 4 local; each chunk's keys lie along its own direction, except one
    key of chunk 2 (head 0) / 5 (head 1), reversed, and one key of chunk 6 (head 0), orthogonal-ish: the
    outliers are those chunks in order of their minimum cosine, kept statically, out of the landmarks."""
    gen = torch.Generator().manual_seed(3)
    h, chunk, chunks, d = 2, 4, 12, 8
    directions = torch.nn.functional.normalize(torch.randn(h, chunks, 1, d, generator=gen), dim=-1)
    keys = (directions + 0.02 * torch.randn(h, chunks, chunk, d, generator=gen)).clone()
    keys[0, 2, 1] = -directions[0, 2, 0]
    keys[1, 5, 3] = -directions[1, 5, 0]
    orthogonal = torch.randn(d, generator=gen)
    keys[0, 6, 0] = orthogonal - (orthogonal @ directions[0, 6, 0]) * directions[0, 6, 0] + 0.3 * directions[0, 6, 0]
    keys = keys.reshape(1, h, chunks * chunk, d)
    _, low = min_cosine(keys[0, :, :32], chunk)
    assert low[0].argsort()[:2].tolist() == [2, 6] and low[1].argmin().item() == 5
    valid = torch.ones(1, chunks * chunk, dtype=torch.bool)
    for outliers, want in ((1, ({2}, {5})), (2, ({2, 6}, {5, int(low[1].argsort()[1])}))):
        method = _method(h, d)
        _plan_for(method, 0.5, chunks * chunk, 4, chunk, outliers)
        kept = method.select(_context(keys, valid, budget=16 + 4 * outliers + 8, keep=0.5))[0]  # local + O + 2 slots
        slots = method.engine.layers[0]
        paged = slots.page_positions.view(h, -1)  # every page is real: 8 - O chunks
        for head in range(h):
            static_chunks = {c for c in range(8) if bool(kept[head, c * chunk:(c + 1) * chunk].all())}
            assert want[head] <= static_chunks
            assert set((paged[head] // chunk).tolist()) == set(range(8)) - want[head]
            assert bool(kept[head, 32:].all())  # local chunks
        assert slots.index.landmarks.shape == (h, 8 - outliers, d)


def test_chunk_scores_by_hand():
    """Softmax over chunks of ``scaling * q . landmark`` per query row, summed over the query positions, max
    over the group (2 heads x 2 positions), a -inf base page excluded."""
    landmarks = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # (1, P=3, D=2)
    queries = torch.tensor([[[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [-1.0, 0.5]]])  # head 0: rows 0-1, head 1: 2-3
    base = torch.tensor([[0.0, 0.0, float("-inf")]])
    index = LowRankIndex(landmarks, torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long),
                         torch.zeros(1, 1, 2), torch.zeros(1, dtype=torch.long), None, 0.5, 2)
    probs = []
    for q in queries[0].tolist():
        logits = [0.5 * (q[0] * k[0] + q[1] * k[1]) for k in landmarks[0, :2].tolist()]
        total = sum(math.exp(x) for x in logits)
        probs.append([math.exp(x) / total for x in logits])
    head0 = [probs[0][p] + probs[1][p] for p in range(2)]
    head1 = [probs[2][p] + probs[3][p] for p in range(2)]
    want = torch.tensor([[max(head0[0], head1[0]), max(head0[1], head1[1]), float("-inf")]])
    torch.testing.assert_close(index.page_scores(queries, base), want)


def test_auto_rank_and_chunk_shrink_until_the_metadata_fits_half_the_budget():
    method = ShadowKV()
    method.n_kv_heads, method.head_dim = 3, 64  # SmolLM2-135M: 3 KV heads x 64
    assert method.resolved(1.0) == method.resolved(0.5) == (30, 8)  # 30/384 + 1/16 = 14.1% <= 25%
    assert method.resolved(0.25) == (30, 16)  # chunk doubled: 7.8% + 3.1% = 10.9% <= 12.5%
    assert method.resolved(0.1) == (7, 32)  # rank 15 (7.0%), chunk 32 (5.5%), rank 7: 3.4% <= 5%
    method.n_kv_heads = 2  # Qwen2.5-0.5B: 2 x 64
    assert method.resolved(0.5) == (20, 8)
    fixed = ShadowKV(rank=30, chunk=8)
    fixed.n_kv_heads, fixed.head_dim = 3, 64
    assert fixed.resolved(0.1) == (30, 8)  # explicit values are not shrunk
    only_rank = ShadowKV(chunk=8)
    only_rank.n_kv_heads, only_rank.head_dim = 3, 64
    assert only_rank.resolved(0.1) == (1, 8)  # chunk fixed at 8: its landmarks alone cost 6.25% > 5%, rank -> 1


def _generate(model, ids, mask, cache, new_tokens=4):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False)


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_budget_pays_factors_and_landmarks(keep):
    """Per row: kept prompt tokens + the metadata's token-equivalents <= round(keep T L H), short of it by
    less than a chunk per retrieving head; the charge equals the index's bytes within one token; the
    cache's device bytes count the index."""
    model = tiny_model("llama", layers=2, heads=8, kv_heads=4)
    lengths = [960, 700]
    ids, mask = left_padded_batch(lengths, seed=5)
    cache = hc.make_cache(model, "shadowkv", keep)
    _generate(model, ids, mask, cache)
    n_layers, n_kv, d = 2, 4, 16
    kept = torch.stack([layer.kept_prompt_tokens() for layer in cache.layers]).sum(dim=(0, 2))  # (B,)
    plans = [cache.method.plan(keep, n) for n in lengths]
    assert plans[0].roles == ["retrieve", "retrieve"]
    for got, n, plan in zip(kept.tolist(), lengths, plans):
        total = total_budget(keep, n, n_layers, n_kv)
        if plan.roles[0] == "retrieve":
            assert total - plan.chunk * n_layers * n_kv < got + plan.metadata <= total
        else:
            assert got == total
    plan, n = plans[0], lengths[0]
    landmarks = n // plan.chunk - cache.method.local_chunks - plan.outliers
    elements = n * plan.rank + n_kv * plan.rank * d + n_kv * landmarks * d  # per layer: U_r, S V^T, landmarks
    assert 0 <= plan.metadata * 2 * d - n_layers * elements < 2 * d
    index = cache.method.engine.layers[0].index
    if plans[1].roles[0] != "retrieve":  # a single row: the index holds exactly what was charged
        assert index.u.numel() + index.sv.numel() + index.landmarks.numel() == elements
    stats = cache.stats()
    assert stats["device_bytes"] == sum(layer.nbytes() for layer in cache.layers) + stats["index_bytes"]
    assert stats["shadowkv_rank"] == plan.rank and stats["shadowkv_chunk"] == plan.chunk
    assert stats["keep_fraction"] <= keep + 1e-9


def test_decode_retrieves_values_only_through_the_real_cache():
    """keep 0.25 on the tiny model: decoding runs and fetches; bytes moved = fetched tokens x D x 4 (values,
    fp32: keys are rebuilt on the device); the host tier holds the paged values only; after a step each
    head holds the top chunks of that step's queries."""
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    ids = torch.randint(3, 128, (1, 960), generator=torch.Generator().manual_seed(4))
    cache = hc.make_cache(model, "shadowkv", 0.25)
    captured = {}
    original = cache.method.wanted

    def spy(layer, slots, queries):
        captured[layer.layer_idx] = queries.clone()
        return original(layer, slots, queries)

    cache.method.wanted = spy
    out = _generate(model, ids, torch.ones_like(ids), cache, new_tokens=6)
    assert out.shape == (1, 966) and cache.method.plan(0.25, 960).roles == ["retrieve", "retrieve"]
    stats = cache.stats()
    assert stats["retrieval_bytes"] > 0 and stats["retrieval_tokens"] > 0
    assert stats["retrieval_bytes"] == stats["retrieval_tokens"] * 16 * 4
    paged = sum(slots.page_positions.numel() for slots in cache.method.engine.layers.values())
    assert stats["host_bytes"] == paged * 16 * 4
    for layer_idx, slots in cache.method.engine.layers.items():
        grouped = captured[layer_idx].reshape(2, -1, 16)
        scores = slots.index.page_scores(grouped, slots.base)
        top = scores.topk(slots.width, dim=-1).indices
        assert torch.equal(slots.resident, torch.zeros_like(slots.resident).scatter_(1, top, True))


def test_short_prompts_and_sliding_layers_are_static():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(5))
    cache = hc.make_cache(model, "shadowkv", 0.25)
    _generate(model, ids, torch.ones_like(ids), cache)
    assert cache.method.plan(0.25, 60).roles == ["static", "static"]
    stats = cache.stats()
    assert stats["kept_tokens"] == total_budget(0.25, 60, 2, 2) and stats["retrieval_bytes"] == 0
    assert stats["host_bytes"] == 0 and stats["index_bytes"] == 0


def _steps(model, cache, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for i in range(ids.shape[1]):
            logits = model(ids[:, i:i + 1], **cache_kwargs(cache, model)).logits[:, -1]
    return logits


@pytest.mark.parametrize("edit,offload", [("reorder", "host"), ("repeat", "disk")])
def test_row_edits_match_a_cache_built_in_that_order(edit, offload):
    """Beam search's reorder (``[2, 0, 0]``) or ``batch_repeat_interleave(2)`` after 3 decode steps, then 3
    more: the logits of a cache that saw the rows in that order (landmarks, factors, values follow; a
    duplicated row shares its ``U_r`` block)."""
    model = tiny_model("llama", layers=2, heads=8, kv_heads=4)
    gen = torch.Generator().manual_seed(9)
    prompts = torch.randint(3, 128, (3, 400), generator=gen)
    first, then = torch.randint(3, 128, (3, 3), generator=gen), torch.randint(3, 128, (3, 3), generator=gen)
    order = torch.tensor([2, 0, 0]) if edit == "reorder" else torch.arange(3).repeat_interleave(2)
    edited = hc.make_cache(model, "shadowkv", 0.5, offload=offload)
    with torch.no_grad():
        model(prompts, **cache_kwargs(edited, model))
    _steps(model, edited, first)
    edited.reorder_cache(order) if edit == "reorder" else edited.batch_repeat_interleave(2)
    got = _steps(model, edited, then[order])
    built = hc.make_cache(model, "shadowkv", 0.5, offload=offload)
    with torch.no_grad():
        model(prompts[order], **cache_kwargs(built, model))
    _steps(model, built, first[order])
    torch.testing.assert_close(got, _steps(model, built, then[order]), rtol=1e-4, atol=1e-4)
    index = edited.method.engine.layers[0].index
    assert index.u.shape[0] == 400 * len(set(order.tolist()))  # one U_r block per distinct source row
    assert edited.stats()["retrieval_bytes"] > 0
    edited.close()
    built.close()


@pytest.mark.parametrize("mode", ["assistant_model", "prompt_lookup_num_tokens"])
def test_assisted_decoding_crops_into_retrieved_prompt(mode):
    """Assisted decoding verifies the prompt plus a first draft in one forward, so its crop can reach into
    the compressed prompt: pages holding a cropped position retire (the engine's crop); decoding goes on
    retrieving, and keep 1.0 is plain greedy decoding."""
    model = tiny_model("llama", layers=2, heads=8, kv_heads=4)
    ids = torch.randint(3, 128, (1, 25), generator=torch.Generator().manual_seed(4)).repeat(1, 16)  # 400
    extra = {"assistant_model": model} if mode == "assistant_model" else {"prompt_lookup_num_tokens": 3}
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=10, do_sample=False)
        exact = hc.make_cache(model, "shadowkv", 1.0)
        assert torch.equal(model.generate(ids, **cache_kwargs(exact, model), max_new_tokens=10, do_sample=False,
                                          **extra), plain)
        cache = hc.make_cache(model, "shadowkv", 0.5)
        out = model.generate(ids, **cache_kwargs(cache, model), max_new_tokens=10, do_sample=False, **extra)
    assert cache.method.plan(0.5, 400).roles == ["retrieve", "retrieve"]
    assert 400 < out.shape[1] <= 410 and cache.get_seq_length() == out.shape[1] - 1
    assert cache.stats()["retrieval_bytes"] > 0
