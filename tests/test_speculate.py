"""prefetch='speculate': each layer's refill chosen one layer early from the previous layer's input."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, tiny_model

import heterocache as hc
from heterocache.retrieval.speculate import layer_query, rotate

KEEP = 0.25
OPTIONS = {"refill": "torch", "refresh_drift": 0.0}  # every step refills, so every layer fetches


def _prompt(length: int = 400, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _identity_layers(model) -> None:
    """Every decoder layer adds nothing to the residual stream (attention and MLP outputs zeroed):
    each layer's input is the embedding, so a layer's query from the previous layer's input is exact."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def _greedy(model, ids, cache, steps: int = 8, **kwargs):
    out = model.generate(ids, **hc.cache_kwargs(cache, model), max_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


def _equal_to_default(model, ids, prefetch: str):
    """Greedy tokens and logits of ``prefetch`` equal the default's; returns (default stats, its stats, cache)."""
    base = hc.make_cache(model, "heterocache", KEEP, **OPTIONS)
    other = hc.make_cache(model, "heterocache", KEEP, prefetch=prefetch, **OPTIONS)
    tokens, logits = _greedy(model, ids, base)
    tokens_o, logits_o = _greedy(model, ids, other)
    assert torch.equal(tokens, tokens_o) and torch.allclose(logits, logits_o, atol=1e-5)
    return base.stats(), other.stats(), other


def test_rotate_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=gen)
    cos, sin = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    expected, _ = apply_rotary_pos_emb(q, q, cos, sin)
    assert torch.equal(rotate(q, cos, sin), expected)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_layer_query_is_the_attention_query(family):
    """The query the speculator computes from a layer's input equals the one its attention computes."""
    model = tiny_model(family, layers=2)
    captured = {}
    attention = model.model.layers[1].self_attn
    inputs = {}
    model.model.layers[1].register_forward_pre_hook(
        lambda m, a, kw: inputs.update(hidden=a[0] if a else kw["hidden_states"], emb=kw["position_embeddings"]),
        with_kwargs=True)
    original = attention.q_proj.forward

    def spy(x):
        out = original(x)
        captured["q"] = out
        return out

    attention.q_proj.forward = spy
    with torch.no_grad():
        model(_prompt(12))
        q = layer_query(model.model.layers[1], inputs["hidden"], inputs["emb"])
    b, t, _ = inputs["hidden"].shape
    raw = captured["q"].view(b, t, -1, attention.head_dim)
    if hasattr(attention, "q_norm"):
        raw = attention.q_norm(raw)
    cos, sin = inputs["emb"]
    assert torch.allclose(q, rotate(raw.transpose(1, 2), cos, sin), atol=1e-6)


def test_exact_speculation_selects_what_the_step_query_selects():
    """With layers that leave the residual stream unchanged the speculated query is the true one:
    tokens and logits equal the default's, and every fetch but the first layer's is prefetched."""
    model = tiny_model("llama", layers=4)
    _identity_layers(model)
    ids = _prompt()
    base = hc.make_cache(model, "heterocache", KEEP, **OPTIONS)
    spec = hc.make_cache(model, "heterocache", KEEP, prefetch="speculate", **OPTIONS)
    tokens, logits = _greedy(model, ids, base)
    tokens_s, logits_s = _greedy(model, ids, spec)
    assert torch.equal(tokens, tokens_s)
    assert torch.allclose(logits, logits_s, atol=1e-5)
    a, b = base.stats(), spec.stats()
    assert a["retrieval_bytes"] == b["retrieval_bytes"] > 0
    assert a["retrieval_prefetched_bytes"] == 0
    assert 0 < b["retrieval_critical_bytes"] < b["retrieval_prefetched_bytes"]
    assert b["retrieval_critical_bytes"] + b["retrieval_prefetched_bytes"] == b["retrieval_bytes"]


def test_first_layer_is_the_only_critical_one():
    """A random model: layer 0 refills with its own query (critical), every later one a layer early."""
    model = tiny_model("llama", layers=3)
    ids = _prompt()
    cache = hc.make_cache(model, "heterocache", KEEP, prefetch="speculate", **OPTIONS)
    critical: list[int] = []
    runtime = cache.method.runtime
    original = runtime.refill

    def spy(layer, queries, prefetched=False):
        if not prefetched:
            critical.append(layer.layer_idx)
        original(layer, queries, prefetched)

    runtime.refill = spy
    _greedy(model, ids, cache, steps=5)
    assert set(critical) == {0}  # decode steps: only layer 0 refills on the critical path
    assert runtime.speculator.speculated == 2 * 4  # layers 1, 2 in 4 decode forwards after the prefill


def test_native_refill_and_drift_gate_with_speculation():
    """The C refill takes speculated queries too (same tokens as its PyTorch reference), and the gate
    skips refills on the speculated queries."""
    model = tiny_model("llama", layers=3)
    ids = _prompt()
    runs = {}
    for refill in ("torch", "auto"):
        cache = hc.make_cache(model, "heterocache", KEEP, prefetch="speculate", refill=refill, refresh_drift=0.3)
        runs[refill] = _greedy(model, ids, cache)[0], cache.stats()
    assert torch.equal(runs["torch"][0], runs["auto"][0])
    for _, stats in runs.values():
        assert stats["retrieval_prefetched_bytes"] > 0


def test_batch_beam_search_and_assisted_decoding_run():
    model = tiny_model("llama", layers=3)
    ids, mask = left_padded_batch([400, 330, 260])
    cache = hc.make_cache(model, "heterocache", KEEP, prefetch="speculate", **OPTIONS)
    out = model.generate(ids, attention_mask=mask, **hc.cache_kwargs(cache, model), max_new_tokens=6,
                         do_sample=False)
    assert out.shape == (3, ids.shape[1] + 6)
    assert cache.stats()["retrieval_prefetched_bytes"] > 0
    beams = hc.make_cache(model, "heterocache", KEEP, prefetch="speculate", **OPTIONS)
    out = model.generate(_prompt(), **hc.cache_kwargs(beams, model), max_new_tokens=6, num_beams=3, do_sample=False)
    assert out.shape[1] == 406
    lookup = hc.make_cache(model, "heterocache", KEEP, prefetch="speculate", **OPTIONS)
    out = model.generate(_prompt(), **hc.cache_kwargs(lookup, model), max_new_tokens=6, do_sample=False,
                         prompt_lookup_num_tokens=3)
    assert out.shape[1] == 406


def test_keep_one_is_exact_and_another_cache_is_left_alone():
    """At keep 1.0 nothing retrieves (FullKV-exact); a forward through another cache never triggers the
    hooks of this one; close() removes them."""
    model = tiny_model("llama", layers=3)
    ids = _prompt(200)
    reference = _greedy(model, ids, hc.make_cache(model, "full", 1.0))[0]
    cache = hc.make_cache(model, "heterocache", 1.0, prefetch="speculate")
    assert torch.equal(_greedy(model, ids, cache)[0], reference)
    spec = hc.make_cache(model, "heterocache", KEEP, prefetch="speculate", **OPTIONS)
    _greedy(model, ids, spec, steps=2)
    before = spec.method.runtime.speculator.speculated
    _greedy(model, ids, hc.make_cache(model, "snapkv", KEEP), steps=4)
    assert spec.method.runtime.speculator.speculated == before
    handles = len(model.model.layers[0]._forward_pre_hooks)
    spec.close()
    assert len(model.model.layers[0]._forward_pre_hooks) == handles - 1


def test_options_are_checked():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="prefetch"):
        hc.make_cache(model, "heterocache", KEEP, prefetch="later")
    with pytest.raises(ValueError, match="prefetch"):
        hc.make_cache(model, "heterocache", KEEP, retrieval="async", prefetch="speculate")


def test_a_model_without_the_modules_is_refused():
    model = tiny_model("llama", layers=2)
    del model.model.layers[1].input_layernorm
    with pytest.raises(ValueError, match="input_layernorm"):
        hc.make_cache(model, "heterocache", KEEP, prefetch="speculate")



def test_hybrid_full_layers_after_sliding_ones_are_speculated():
    """Gemma-3 style (sliding, full, sliding, full): the full layers follow sliding ones, so their query
    takes the full layers' own rotary embedding; decode runs and their bytes are prefetched."""
    from conftest import hybrid_model

    model = hybrid_model("gemma3")
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(4))
    cache = hc.make_cache(model, "heterocache", KEEP, prefetch="speculate", **OPTIONS)
    _greedy(model, ids, cache, steps=5)
    stats = cache.stats()
    assert cache.method.runtime.speculator.speculated > 0
    assert stats["retrieval_prefetched_bytes"] > 0


def test_hybrid_speculation_is_exact_when_layers_add_nothing():
    """The cross-type rotary is the right one: with layers leaving the residual stream unchanged the
    speculated queries are the true ones, so the tokens equal the default's."""
    from conftest import hybrid_model

    model = hybrid_model("gemma3")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(4))
    a, b, _ = _equal_to_default(model, ids, "speculate")
    assert a["retrieval_bytes"] == b["retrieval_bytes"] and b["retrieval_critical_bytes"] == 0


def test_verify_refills_only_where_the_true_query_disagrees():
    """prefetch='verify': after the speculative refill the true query runs the drift gate again. With
    exact speculation it fetches nothing more (critical bytes = the first layer's, as 'speculate');
    on a random model it moves some bytes back to the critical path."""
    model = tiny_model("llama", layers=4)
    _identity_layers(model)
    ids = _prompt()
    runs = {}
    for prefetch in ("speculate", "verify"):
        cache = hc.make_cache(model, "heterocache", KEEP, prefetch=prefetch, **OPTIONS)
        runs[prefetch] = _greedy(model, ids, cache)[0], cache.stats()
    assert torch.equal(runs["speculate"][0], runs["verify"][0])
    assert runs["verify"][1]["retrieval_critical_bytes"] == runs["speculate"][1]["retrieval_critical_bytes"]
    random_model = tiny_model("llama", layers=4, seed=5)
    stats = {}
    for prefetch in ("speculate", "verify"):
        cache = hc.make_cache(random_model, "heterocache", KEEP, prefetch=prefetch, **OPTIONS)
        _greedy(random_model, ids, cache)
        stats[prefetch] = cache.stats()
    assert stats["verify"]["retrieval_critical_bytes"] > stats["speculate"]["retrieval_critical_bytes"]
    assert stats["verify"]["retrieval_prefetched_bytes"] > 0


def _zero_mlps(model) -> None:
    """Every MLP block adds nothing: a layer's next-layer input is its post-attention residual."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_late_speculation_is_exact_when_only_the_mlps_add_nothing(family):
    """prefetch='speculate_late' speculates from layer l's post-attention residual (before its MLP): with
    the MLPs zeroed that is layer l+1's input, so tokens and logits equal the default's and every fetch
    but the first layer's is prefetched; for Gemma-3 the attention output's own norm is applied."""
    if family == "gemma3":
        from conftest import hybrid_model

        model = hybrid_model("gemma3")
        ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(4))
    else:
        model = tiny_model("llama", layers=4)
        ids = _prompt()
    _zero_mlps(model)
    a, b, late = _equal_to_default(model, ids, "speculate_late")
    assert a["retrieval_bytes"] == b["retrieval_bytes"] > 0
    assert b["retrieval_prefetched_bytes"] > 0
    assert b["retrieval_critical_bytes"] < b["retrieval_prefetched_bytes"]
    assert late.method.runtime.speculator.speculated > 0


def test_late_speculation_differs_from_input_speculation_on_a_random_model():
    """On a model whose layers all add to the residual stream the two estimates are different queries:
    both runs decode, every later layer is speculated, and the stats split adds up."""
    model = tiny_model("llama", layers=4, seed=5)
    ids = _prompt()
    seen = {}
    for prefetch in ("speculate", "speculate_late"):
        cache = hc.make_cache(model, "heterocache", KEEP, prefetch=prefetch, **OPTIONS)
        queries = []
        runtime = cache.method.runtime
        original = runtime.refill

        def spy(layer, q, prefetched=False, original=original, queries=queries):
            if prefetched and layer.layer_idx == 2:
                queries.append(q.clone())
            original(layer, q, prefetched)

        runtime.refill = spy
        _greedy(model, ids, cache, steps=4)
        stats = cache.stats()
        assert stats["retrieval_critical_bytes"] + stats["retrieval_prefetched_bytes"] == stats["retrieval_bytes"]
        assert runtime.speculator.speculated == 3 * 3
        seen[prefetch] = queries[0]
    assert not torch.allclose(seen["speculate"], seen["speculate_late"])
