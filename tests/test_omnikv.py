"""OmniKV (spec/baselines.md s.9): filter layers' per-step top-k feeds the sparse layers after them."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import hybrid_model, left_padded_batch, tiny_model
from transformers import DynamicCache

import heterocache as hc
from heterocache.budget import sliding_cap, total_budget
from heterocache.hf import cache_kwargs
from heterocache.methods.omnikv import default_filter_layers, resolve_plan
from heterocache.models import layer_windows

LENGTHS = [80, 61]  # left padding in row 1


@functools.cache
def _model(layers: int = 6):
    return tiny_model("llama", layers=layers, heads=4, kv_heads=2)


def _prefill(model, cache, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask, **cache_kwargs(cache, model)).logits[:, -1]


def _step(model, cache, token, mask):
    with torch.no_grad():
        return model(token, attention_mask=mask, **cache_kwargs(cache, model)).logits[:, -1]


def _record_queries(cache) -> dict[int, torch.Tensor]:
    """Wrap the method's pre-attention hook: the last decode query of every layer."""
    seen: dict[int, torch.Tensor] = {}
    method, hook = cache.method, cache.method.before_decode_attention

    def wrapper(layer, queries):
        seen[layer.layer_idx] = queries.clone()
        hook(layer, queries)

    method.before_decode_attention = wrapper
    return seen


def _prompt_positions(layer, row: int, head: int) -> set[int]:
    positions = layer.padded()[2][row, head]
    return set(positions[(positions >= 0) & (positions < layer.prefill_len)].tolist())


def _hand_topk(filter_layer, queries: torch.Tensor, scaling: float, row: int, k: int, selector: str) -> list[int]:
    """Max over the filter layer's query heads of ``scaling * q . k_j`` over its stored prompt keys, top k."""
    keys, _, positions, _ = filter_layer.padded()
    n_kv, group = keys.shape[1], queries.shape[1] // keys.shape[1]
    prompt = (positions[row, 0] >= 0) & (positions[row, 0] < filter_layer.prefill_len)
    pos = positions[row, 0][prompt]
    per_head = []
    for h in range(queries.shape[1]):
        logits = (queries[row, h, -1].float() @ keys[row, h // group][prompt].float().T) * scaling
        per_head.append(torch.softmax(logits, -1) if selector == "softmax_before_last" else logits)
    assert all(torch.equal(positions[row, h][prompt], pos) for h in range(n_kv))  # dense: same prompt per head
    score = torch.stack(per_head).amax(0)
    return pos[score.topk(k).indices].tolist()


def test_default_filter_layers():
    assert default_filter_layers(32) == [2, 8, 18]  # published for Llama-3-8B
    assert default_filter_layers(30) == [2, 8, 17]  # SmolLM2-135M
    assert default_filter_layers(24) == [2, 6, 14]  # Qwen2.5-0.5B
    assert default_filter_layers(6) == [0, 2, 3]
    assert default_filter_layers(2) == [0, 1]


def test_roles_are_shed_in_the_documented_order():
    """SmolLM2's shape (30 layers, 3 KV heads), a 3,000-token prompt: the published layout at keep 0.5;
    wait layers shed at 0.25; the dense layers before the first filter static and the last filter
    dropped at 0.1; static everywhere when one filter layer cannot be paid. Totals exact every time."""
    windows, heads, n = [None] * 30, 3, 3000
    filters = default_filter_layers(30)
    want = {
        0.5: ([2, 8, 17], [0, 1, 2, 3, 8, 9, 17, 18], [3, 9, 18], [], []),
        0.25: ([2, 8, 17], [0, 1, 2, 8, 17], [], [], ["wait"]),
        0.1: ([2, 8], [2, 8], [], [0, 1], ["wait", "dense-before-filter", "filter 17"]),
    }
    for keep, (filt, dense, wait, static, shed) in want.items():
        plan = resolve_plan(windows, heads, keep, n, filters, 1, 0.02)
        assert plan.layers("filter") == filt and plan.layers("dense", "filter", "wait") == dense
        assert plan.layers("wait") == wait and plan.layers("snap") == static and plan.shed == shed
        assert sum(map(sum, plan.budgets)) == total_budget(keep, n, 30, heads)
        equal = [b for layer, b in enumerate(plan.budgets) if plan.roles[layer] in ("snap", "sparse")]
        assert all(b == [n] * heads for layer, b in enumerate(plan.budgets) if layer in dense)
        assert {x for b in equal for x in b} <= {plan.k, plan.k + 1}
        assert sum(len(set(b)) > 1 for b in equal) <= 1  # at most one layer with heads of k and k + 1
        for layer in plan.layers("sparse"):  # fed by the closest filter layer before it
            assert plan.source[layer] == max(f for f in filt if f < layer)
    assert resolve_plan(windows, heads, 0.25, n, filters, 1, 0.02).k == 300  # (7.5 - 5 layers) * 3000 / 25
    assert resolve_plan(windows, heads, 0.1, n, filters, 1, 0.02).k == 107  # (3 - 2) * 3000 / 28
    tiny = resolve_plan(windows, heads, 0.04, n, filters, 1, 0.02)  # 1.2 layers: one filter leaves 21 < 60
    assert tiny.shed[-1] == "retrieval" and set(tiny.roles) == {"static"}
    assert sum(map(sum, tiny.budgets)) == total_budget(0.04, n, 30, heads)


@pytest.mark.parametrize("selector", ["last", "softmax_before_last"])
def test_sparse_layers_hold_exactly_the_filter_choice(selector):
    """6 layers, filters 1 and 3, no wait layer, keep 0.6, a left-padded batch: after every decode step each
    sparse head holds exactly the top-k prompt positions of its filter layer (a hand-computed max over the
    filter's query heads of this step's logits on its stored keys) plus every decode token."""
    model = _model()
    ids, mask = left_padded_batch(LENGTHS)
    cache = hc.make_cache(model, "omnikv", 0.6, filter_layers=[1, 3], wait_layers=0, selector=selector)
    logits = _prefill(model, cache, ids, mask)
    queries = _record_queries(cache)
    stats = cache.stats()
    assert stats["omnikv_filter_layers"] == [1, 3] and stats["omnikv_sparse_layers"] == [2, 4, 5]
    assert stats["omnikv_dense_layers"] == [0, 1, 3]
    source = {2: 1, 4: 3, 5: 3}
    width = ids.shape[1]
    for step in range(4):
        token = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        logits = _step(model, cache, token, mask)
        for sparse, f in source.items():
            layer, filt = cache.layers[sparse], cache.layers[f]
            for row in range(2):
                for head in range(2):
                    held = _prompt_positions(layer, row, head)
                    want = _hand_topk(filt, queries[f], cache.method.scaling[f], row, len(held), selector)
                    assert held == set(want), (step, sparse, row, head)
                    positions = layer.padded()[2][row, head]
                    assert set(positions[positions >= width].tolist()) == set(range(width, width + step + 1))
        for row, n in enumerate(LENGTHS):  # accounting: the total of DESIGN s.2, every step
            kept = sum(int(layer.kept_prompt_tokens()[row].sum()) for layer in cache.layers)
            assert kept == total_budget(0.6, n, 6, 2)
    k = cache.stats()["omnikv_k"]
    assert k == (total_budget(0.6, 80, 6, 2) - 3 * 2 * 80) // 6  # dense heads T, the rest shared
    assert cache.stats()["retrieval_bytes"] > 0


def test_shedding_on_a_real_cache_keeps_the_total():
    """8 layers, filters 2 and 5, one wait layer: keep 0.5 sheds the wait layers and makes layers 0, 1
    static (SnapKV); keep 0.2 also drops filter 5; keep 0.1 cannot pay one filter layer (static
    everywhere, nothing in the tier). Per row the kept prompt entries are the exact total; the tier
    holds every prompt token of the sparse layers."""
    model = _model(8)
    ids, mask = left_padded_batch(LENGTHS)
    d = model.config.head_dim
    roles = {0.5: ([2, 5], [0, 1], [3, 4, 6, 7]), 0.2: ([2], [0, 1], [3, 4, 5, 6, 7]), 0.1: ([], list(range(8)), [])}
    for keep, (filters, static, sparse) in roles.items():
        cache = hc.make_cache(model, "omnikv", keep, filter_layers=[2, 5], wait_layers=1)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), max_new_tokens=3,
                           min_new_tokens=3, do_sample=False)
        stats = cache.stats()
        assert stats["omnikv_filter_layers"] == filters and stats["omnikv_static_layers"] == static
        assert stats["omnikv_sparse_layers"] == sparse and stats["omnikv_wait_layers"] == []
        kept = torch.stack([layer.kept_prompt_tokens() for layer in cache.layers]).sum(dim=(0, 2)).tolist()
        assert kept == [total_budget(keep, n, 8, 2) for n in LENGTHS]
        # K + V (fp32) of every prompt token of the sparse layers (the tier pads rows to the longest prompt)
        assert stats["host_bytes"] == len(sparse) * len(LENGTHS) * max(LENGTHS) * 2 * 2 * d * 4
        assert (stats["retrieval_bytes"] > 0) == bool(sparse)
        if static:
            assert stats["omnikv_mode"] == ("static" if not filters else "retrieval")


def test_decode_retrieves_and_counts_the_lead():
    """Default filters of 6 layers ({0, 2, 3}) at keep 0.25: only filter 0 is affordable, layers 1-5 are
    sparse; every decode step fetches, and each sparse layer's choice was known ``layer - 0`` layers
    before it was needed."""
    model = _model()
    ids, mask = left_padded_batch(LENGTHS)
    cache = hc.make_cache(model, "omnikv", 0.25)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), max_new_tokens=5, min_new_tokens=5,
                       do_sample=False)
    stats = cache.stats()
    assert stats["omnikv_filter_layers"] == [0] and stats["omnikv_sparse_layers"] == [1, 2, 3, 4, 5]
    assert stats["omnikv_shed"] == ["wait", "filter 3", "filter 2"]
    steps = 4  # the first token comes from the prefill
    assert stats["omnikv_selections"] == 5 * steps
    assert stats["omnikv_lead_layers"] == (1 + 2 + 3 + 4 + 5) * steps and stats["omnikv_min_lead"] == 1
    k = stats["omnikv_k"]
    assert k == (total_budget(0.25, 80, 6, 2) - 2 * 80) // 10
    row_bytes = 2 * model.config.head_dim * 4
    assert 0 < stats["retrieval_bytes"] <= steps * 5 * 2 * 2 * (k + 1) * row_bytes  # at most k rows per head
    assert stats["keep_fraction"] == pytest.approx(sum(total_budget(0.25, n, 6, 2) for n in LENGTHS)
                                                   / (sum(LENGTHS) * 12))


def test_reorder_and_keep_one():
    """Beam-style ``reorder_cache`` after 2 steps gives the logits of a cache built in that order (the
    sparse layers' slots, tier rows and filter sources follow); keep 1.0 is DynamicCache exactly."""
    model = _model()
    gen = torch.Generator().manual_seed(9)
    prompts = torch.randint(3, 128, (3, 90), generator=gen)
    first, then = torch.randint(3, 128, (3, 2), generator=gen), torch.randint(3, 128, (3, 3), generator=gen)
    order = torch.tensor([2, 0, 0])

    def steps(cache, tokens):
        with torch.no_grad():
            for i in range(tokens.shape[1]):
                out = model(tokens[:, i:i + 1], **cache_kwargs(cache, model)).logits[:, -1]
        return out

    edited = hc.make_cache(model, "omnikv", 0.25)
    with torch.no_grad():
        model(prompts, **cache_kwargs(edited, model))
    steps(edited, first)
    edited.reorder_cache(order)
    got = steps(edited, then[order])
    built = hc.make_cache(model, "omnikv", 0.25)
    with torch.no_grad():
        model(prompts[order], **cache_kwargs(built, model))
    steps(built, first[order])
    want = steps(built, then[order])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert edited.stats()["host_bytes"] == built.stats()["host_bytes"]

    ids, mask = left_padded_batch(LENGTHS)
    outs = []
    for cache in (hc.make_cache(model, "omnikv", 1.0), DynamicCache()):
        with torch.no_grad():
            outs.append(model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=5,
                                       min_new_tokens=5, do_sample=False))
    assert torch.equal(outs[0], outs[1])


def test_options_are_checked():
    model = _model()
    with pytest.raises(ValueError, match="filter_layers"):
        hc.make_cache(model, "omnikv", 0.5, filter_layers=[7])
    with pytest.raises(ValueError, match="filter_layers"):
        hc.make_cache(model, "omnikv", 0.5, filter_layers="a,b")
    with pytest.raises(ValueError, match="selector"):
        hc.make_cache(model, "omnikv", 0.5, selector="exp")
    cache = hc.make_cache(model, "omnikv", 0.6, filter_layers="1,3", wait_layers=0)
    assert cache.method.filters == [1, 3]


def test_beam_search_and_assisted_decoding_retrieve():
    """3 beams over a left-padded batch (reorders every step) and prompt-lookup assisted decoding (crops
    into the prompt after its first verification) run with retrieval at keep 0.25, within the budget."""
    model = _model()
    ids, mask = left_padded_batch([120, 97], seed=5)
    cache = hc.make_cache(model, "omnikv", 0.25)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), num_beams=3, max_new_tokens=4,
                             min_new_tokens=4, do_sample=False)
    assert out.shape == (2, 124)
    stats = cache.stats()
    assert stats["retrieval_bytes"] > 0 and stats["keep_fraction"] <= 0.25 + 1e-9
    assert stats["omnikv_sparse_layers"] == [1, 2, 3, 4, 5]

    prompt = torch.randint(3, 128, (1, 25), generator=torch.Generator().manual_seed(4)).repeat(1, 8)
    cache = hc.make_cache(model, "omnikv", 0.25)
    with torch.no_grad():
        out = model.generate(prompt, **cache_kwargs(cache, model), max_new_tokens=8, do_sample=False,
                             prompt_lookup_num_tokens=3)
    assert prompt.shape[1] < out.shape[1] <= prompt.shape[1] + 8
    assert cache.get_seq_length() == out.shape[1] - 1 and cache.stats()["retrieval_bytes"] > 0


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_every_prompt_length_keeps_the_total(family):
    """6 layers (gemma3: sliding, full, ...), prompts of 1 to 120 tokens, keep 0.25 / 0.5 / 0.9: the kept
    prompt entries are ``min(round(keep * T * L * H), what the layers can hold)`` whether the prompt is
    served with retrieval or statically (near keep 1 the sliding heads take what full heads cannot)."""
    model = _model() if family == "llama" else hybrid_model("gemma3", layers=6)
    windows = layer_windows(model)
    n_kv = model.config.num_key_value_heads
    gen = torch.Generator().manual_seed(3)
    modes = set()
    for keep in (0.25, 0.5, 0.9):
        for n in (1, 5, 37, 120):
            ids = torch.randint(3, 128, (1, n), generator=gen)
            cache = hc.make_cache(model, "omnikv", keep)
            with torch.no_grad():
                logits = model(ids, **cache_kwargs(cache, model)).logits[:, -1]
                model(logits.argmax(-1, keepdim=True), **cache_kwargs(cache, model))
            capacity = n_kv * sum(sliding_cap(n, w) for w in windows)
            assert cache.stats()["kept_tokens"] == min(total_budget(keep, n, len(windows), n_kv), capacity), (keep, n)
            modes.add(cache.stats()["omnikv_mode"])
    assert modes == {"static", "retrieval"}
