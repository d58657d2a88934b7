"""Prefill selection of the baseline methods on hand-made tensors (no model).

B=2 with left padding in row 1, Hq=4, Hkv=2 (GQA group 2), T=97, D=8, 4 layers. A fake headwise
cache (``FakeLayer``) implements ``padded()``/``restrict()`` on plain tensors for CAKE's cascading
and the decode-eviction hooks.
"""

from __future__ import annotations

import math

import pytest
import torch

from heterocache.budget import budget_table, pyramid_budgets, split_evenly, total_budget, weighted_budgets
from heterocache.methods import DecodeContext, PrefillContext, available_methods, build_method, scoring
from heterocache.methods.scoring import (
    causal_column_sums,
    compact,
    expand_compact,
    pool1d,
    reduce_gqa,
    topk_mask,
    window_attention,
)

B, HQ, HKV, T, D, N_LAYERS = 2, 4, 2, 97, 8, 4
PAD = 13  # left padding of row 1
SCALING = 1 / math.sqrt(D)
METHODS = ["streamingllm", "h2o", "snapkv", "pyramidkv", "cake", "tova"]


class FakeLayer:
    """Ragged per-(batch, KV head) storage, right-padded on request, like ``HeadwiseLayer``."""

    def __init__(self, keys: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        self.keys, self.positions = self._pack(keys, positions.masked_fill(~mask, -1), mask)

    @staticmethod
    def _pack(keys, positions, mask):
        order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., : int(mask.sum(-1).max())]
        kept = mask.gather(-1, order)
        keys = keys.gather(2, order[..., None].expand(-1, -1, -1, keys.shape[-1]))
        return keys * kept[..., None], positions.gather(-1, order).masked_fill(~kept, -1)

    def padded(self):
        return self.keys, self.keys.clone(), self.positions, (self.positions >= 0).sum(-1)

    def restrict(self, keep: torch.Tensor) -> None:
        assert keep.shape == self.positions.shape and not (keep & (self.positions < 0)).any()
        self.keys, self.positions = self._pack(self.keys, self.positions, keep)

    def append(self, key: torch.Tensor) -> None:
        # new token after the padding slots: valid slots stay ascending but are not contiguous
        position = self.positions.amax(-1, keepdim=True) + 1
        self.keys = torch.cat([self.keys, key], dim=2)
        self.positions = torch.cat([self.positions, position], dim=-1)

    def kept_positions(self, b: int, h: int) -> list[int]:
        row = self.positions[b, h]
        return row[row >= 0].tolist()


class FakeCache:
    def __init__(self):
        self.layers: list[FakeLayer] = []


def make_inputs(seed: int, length: int = T, pad: int = PAD, temperature: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(B, HQ, length, D, generator=generator) * temperature
    keys = torch.randn(B, HKV, length, D, generator=generator)
    valid = torch.ones(B, length, dtype=torch.bool)
    valid[1, :pad] = False
    return queries, keys, valid


def layer_budget(method, layer, valid, keep, n_layers=N_LAYERS):
    """What the cache hands the method: ``(B, Hkv)`` budgets of ``layer`` from ``method.budgets``."""
    return budget_table(lambda n: method.budgets(keep, n, n_layers, HKV), valid.sum(-1))[:, layer]


def context(method, layer, queries, keys, valid, keep, cache=None, n_layers=N_LAYERS):
    return PrefillContext(layer, n_layers, queries, keys, keys.clone(), valid, valid.sum(-1), SCALING,
                          keep, layer_budget(method, layer, valid, keep, n_layers), layers=cache.layers if cache else None)


def run_prefill(method, keep, length=T, pad=PAD, n_layers=N_LAYERS, seed=0):
    """Call select layer by layer as the cache does; return the fake cache and per-layer masks."""
    cache, masks = FakeCache(), []
    method.setup(cache)
    for layer in range(n_layers):
        queries, keys, valid = make_inputs(seed + layer, length, pad, temperature=0.5 + layer)
        mask = method.select(context(method, layer, queries, keys, valid, keep, cache, n_layers))
        assert mask.dtype == torch.bool and mask.shape == (B, HKV, length)
        assert not (mask & ~valid[:, None]).any(), "kept a padding token"
        positions = (torch.arange(length) - (~valid).sum(-1, keepdim=True)).clamp(min=0)  # RoPE positions
        cache.layers.append(FakeLayer(keys, mask, positions[:, None].expand(-1, HKV, -1)))
        masks.append(mask)
    return cache, masks


def stored_counts(cache) -> torch.Tensor:
    """(B, layers, Hkv) tokens held."""
    return torch.stack([layer.padded()[3] for layer in cache.layers], dim=1)


def test_all_methods_registered():
    assert set(METHODS) <= set(available_methods())


@pytest.mark.parametrize("keep", [0.05, 0.1, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("name", METHODS)
def test_exact_total_per_row(name, keep):
    cache, _ = run_prefill(build_method(name), keep)
    counts = stored_counts(cache)
    lengths = [T, T - PAD]
    for b, length in enumerate(lengths):
        assert int(counts[b].sum()) == total_budget(keep, length, N_LAYERS, HKV)
        assert int(counts[b].max()) <= length
    if keep == 1.0:
        for b, length in enumerate(lengths):
            assert (counts[b] == length).all()


@pytest.mark.parametrize("keep", [0.1, 0.5])
@pytest.mark.parametrize("name,options", [("h2o", {"normalize": True}), ("snapkv", {"pooling": "avg", "kernel": 5}),
                                          ("streamingllm", {"sinks": 0}), ("pyramidkv", {"window": 8, "beta": 2}),
                                          ("cake", {"tau1": 0.5, "tau2": 2.0, "window": 8})])
def test_exact_total_with_options(name, options, keep):
    cache, _ = run_prefill(build_method(name, **options), keep)
    counts = stored_counts(cache)
    for b, length in enumerate([T, T - PAD]):
        assert int(counts[b].sum()) == total_budget(keep, length, N_LAYERS, HKV)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("length,keep", [(20, 0.5), (20, 0.05), (33, 0.9), (1, 1.0)])
def test_short_prompts_exact(name, length, keep):
    cache, _ = run_prefill(build_method(name), keep, length=length, pad=length // 4)
    counts = stored_counts(cache)
    for b, prompt_len in enumerate([length, length - length // 4]):
        assert int(counts[b].sum()) == total_budget(keep, prompt_len, N_LAYERS, HKV)


def test_unknown_option_rejected():
    with pytest.raises(ValueError, match="unknown option"):
        build_method("snapkv", windw=8)


def test_streamingllm_sinks_plus_recent():
    keep = 0.2  # 0.2 * 97 * 8 = 155.2 -> 155 over 8 heads: 20 x 3, 19 x 5
    cache, _ = run_prefill(build_method("streamingllm"), keep)
    for b, pad in enumerate([0, PAD]):
        for layer in range(N_LAYERS):
            for h in range(HKV):
                budget = int(stored_counts(cache)[b, layer, h])
                kept = cache.layers[layer].kept_positions(b, h)
                prompt_len = T - pad
                assert kept == list(range(4)) + list(range(prompt_len - budget + 4, prompt_len))


def test_snapkv_keeps_what_the_window_attends_to():
    generator = torch.Generator().manual_seed(1)
    peaks = [5, 40, 60]
    keys = torch.randn(1, HKV, T, D, generator=generator) * 0.1
    direction = torch.zeros(D)
    direction[0] = 1.0
    keys[:, :, peaks] = direction * 3
    queries = direction.expand(1, HQ, T, D) * 8
    valid = torch.ones(1, T, dtype=torch.bool)
    window = 32
    # keep = 35 / 97 gives every head exactly window + 3 tokens
    method = build_method("snapkv", kernel=1)
    mask = method.select(context(method, 0, queries, keys, valid, 35 / T, n_layers=1))
    expected = torch.zeros(T, dtype=torch.bool)
    expected[peaks] = True
    expected[T - window :] = True
    assert (mask == expected).all()
    # default max pooling (kernel 7) spreads each peak over +-3: budget window + 21 keeps those blocks
    method = build_method("snapkv")
    mask = method.select(context(method, 0, queries, keys, valid, 53 / T, n_layers=1))
    expected = torch.zeros(T, dtype=torch.bool)
    for p in peaks:
        expected[p - 3 : p + 4] = True
    expected[T - window :] = True
    assert (mask == expected).all()


def eager_attention(queries, keys, valid):
    """Explicit (B, Hq, T, T) causal softmax with padding keys masked; padding query rows zero."""
    expanded = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    logits = queries.double() @ expanded.double().transpose(-1, -2) * SCALING
    length = keys.shape[2]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


@pytest.mark.parametrize("chunk_elements", [100, 1 << 25])  # one KV head per chunk, or all at once
def test_window_attention_matches_eager(monkeypatch, chunk_elements):
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", chunk_elements)
    queries, keys, valid = make_inputs(3)
    eager = eager_attention(queries, keys, valid)
    torch.testing.assert_close(window_attention(queries, keys, 32, SCALING, valid), eager[:, :, -32:].float())
    torch.testing.assert_close(window_attention(queries, keys, 500, SCALING, valid), eager.float())  # w > T


@pytest.mark.parametrize("chunk", [1, 5, 40, None])
def test_h2o_column_sums_chunked_equal_eager(chunk):
    queries, keys, valid = make_inputs(4)
    eager = eager_attention(queries, keys, valid)
    got = causal_column_sums(queries, keys, SCALING, valid, chunk=chunk)
    torch.testing.assert_close(got, eager.sum(dim=2).float())
    # only the last query sees the last key; each valid row sums to one; padding keys get nothing
    torch.testing.assert_close(got[..., -1], eager[..., -1, -1].float())
    torch.testing.assert_close(got.sum(-1), valid.sum(-1, keepdim=True).float().expand(-1, HQ))
    assert (got[1, :, :PAD] == 0).all()


def test_pyramid_layer_budgets_decrease_and_sum():
    keep, n_layers = 0.6, 6
    cache, _ = run_prefill(build_method("pyramidkv"), keep, n_layers=n_layers)
    counts = stored_counts(cache)
    for b, prompt_len in enumerate([T, T - PAD]):
        per_layer = counts[b].sum(-1).tolist()
        assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] > per_layer[-1]
        assert sum(per_layer) == total_budget(keep, prompt_len, n_layers, HKV)
        assert counts[b].tolist() == pyramid_budgets(keep, prompt_len, n_layers, HKV, 32)


def cake_preferences(n_layers, keep, window=32):
    """Layer preferences H * V computed here from eager attention (tau1 = tau2 = 1)."""
    prefs = []
    for layer in range(n_layers):
        queries, keys, valid = make_inputs(layer, temperature=0.5 + layer)
        probs = eager_attention(queries, keys, valid)[:, :, -window:, : T - window]
        entropy = -(probs * torch.log(probs + 1e-10)).sum(dim=(1, 2, 3))
        prefs.append((entropy * probs.var(dim=2).sum(dim=(1, 2))).tolist())
    return prefs


@pytest.mark.parametrize("keep", [0.45, 0.7])
def test_cake_cascading_equals_one_shot(keep):
    cache, _ = run_prefill(build_method("cake"), keep)
    non_cascading, _ = run_prefill(build_method("cake", cascading=False), keep)
    prefs = cake_preferences(N_LAYERS, keep)
    counts = stored_counts(cache)
    for b, prompt_len in enumerate([T, T - PAD]):
        prefix_total = total_budget(keep, prompt_len, N_LAYERS, HKV) - N_LAYERS * HKV * 32
        prefix = weighted_budgets(prefix_total, [p[b] for p in prefs], [HKV * (prompt_len - 32)] * N_LAYERS)
        assert counts[b].tolist() == [split_evenly(p + HKV * 32, HKV) for p in prefix]
        order = sorted(range(N_LAYERS), key=lambda layer: prefs[layer][b])
        assert [int(counts[b, layer].sum()) for layer in order] == sorted(int(counts[b, i].sum()) for i in order)
        for layer in range(N_LAYERS):  # same kept sets as evicting once at the end
            for h in range(HKV):
                assert cache.layers[layer].kept_positions(b, h) == non_cascading.layers[layer].kept_positions(b, h)
    # budgets really differ between layers (follow the preferences)
    assert len(set(counts[0].sum(-1).tolist())) > 1


@pytest.mark.parametrize("name,options", [("h2o", {"decode_eviction": True}), ("tova", {}),
                                          ("streamingllm", {"evict_during_decode": True})])
def test_decode_eviction_keeps_cache_size(name, options):
    method = build_method(name, **options)
    keep, cache = 0.25, FakeCache()
    method.setup(cache)
    for layer in range(N_LAYERS):
        queries, keys, valid = make_inputs(layer)
        mask = method.select(context(method, layer, queries, keys, valid, keep, cache))
        positions = (torch.arange(T) - (~valid).sum(-1, keepdim=True)).clamp(min=0)
        cache.layers.append(FakeLayer(keys, mask, positions[:, None].expand(-1, HKV, -1)))
    before = stored_counts(cache)
    generator = torch.Generator().manual_seed(9)
    for step in range(1, 4):
        for layer, stored in enumerate(cache.layers):
            new_key = torch.randn(B, HKV, 1, D, generator=generator) * 3  # loud: new tokens compete
            stored.append(new_key)
            queries = torch.randn(B, HQ, 1, D, generator=generator)
            budget = layer_budget(method, layer, valid, keep)
            method.on_decode_step(DecodeContext(layer, N_LAYERS, queries, stored, step, SCALING, keep, budget))
        torch.testing.assert_close(stored_counts(cache), before)
    if name == "streamingllm":
        positions = cache.layers[0].kept_positions(0, 0)
        assert positions[:4] == [0, 1, 2, 3] and positions[-1] == T - 1 + 3
    if name == "h2o":  # the most recent ceil(C/2) tokens survive, the scores follow the stored tokens
        budget = int(before[0, 0, 0])
        positions = cache.layers[0].kept_positions(0, 0)
        assert positions[-(budget - budget // 2) :] == list(range(T + 3 - (budget - budget // 2), T + 3))
        assert method.layer_scores[0].shape[-1] == budget


@pytest.mark.parametrize("name,options", [*[(m, {}) for m in METHODS if m != "tova"],
                                          ("tova", {"evict_during_decode": False})])
def test_prefill_only_methods_leave_decode_alone(name, options):
    """Prefill-only methods: the decode hook keeps every stored and appended token."""
    method = build_method(name, **options)
    cache, _ = run_prefill(method, 0.25)
    generator = torch.Generator().manual_seed(5)
    _, _, valid = make_inputs(0)
    for layer, stored in enumerate(cache.layers):
        before = stored_counts(cache)[:, layer]
        stored.append(torch.randn(B, HKV, 1, D, generator=generator) * 3)
        queries = torch.randn(B, HQ, 1, D, generator=generator)
        method.on_decode_step(DecodeContext(layer, N_LAYERS, queries, stored, 1, SCALING, 0.25,
                                            layer_budget(method, layer, valid, 0.25)))
        torch.testing.assert_close(stored_counts(cache)[:, layer], before + 1)


def test_pool1d_hand_computed():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    torch.testing.assert_close(pool1d(scores, 3, "avg"), torch.tensor([[1.0, 2.0, 3.0, 4.0, 3.0]]))
    torch.testing.assert_close(pool1d(-scores, 3, "max"), torch.tensor([[-1.0, -1.0, -2.0, -3.0, -4.0]]))
    # kernel 5 avg at position 0: (1 + 2 + 3) / 5 (zero padding counted)
    assert pool1d(scores, 5, "avg")[0, 0].item() == pytest.approx(6 / 5)
    torch.testing.assert_close(pool1d(scores, 1, "max"), scores)
    with pytest.raises(ValueError, match="odd"):
        pool1d(scores, 4)


def test_reduce_gqa_hand_computed():
    scores = torch.arange(8.0).reshape(1, 4, 2)  # query heads 0,1 -> KV head 0; 2,3 -> KV head 1
    torch.testing.assert_close(reduce_gqa(scores, 2, "mean"), torch.tensor([[[1.0, 2.0], [5.0, 6.0]]]))
    torch.testing.assert_close(reduce_gqa(scores, 2, "max"), torch.tensor([[[2.0, 3.0], [6.0, 7.0]]]))


def test_topk_mask_ties_per_row_k_and_padding():
    scores = torch.tensor([[[1.0, 3.0, 3.0, 3.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]]])
    valid = torch.tensor([[False, True, True, True, True]])
    mask = topk_mask(scores, torch.tensor([[2, 10]]), valid)
    assert mask.tolist() == [[[False, True, True, False, False], [False, True, True, True, True]]]
    assert topk_mask(scores, 0, valid).sum() == 0


def test_compact_roundtrip():
    values = torch.arange(1.0, 7.0).reshape(1, 1, 6)
    mask = torch.tensor([[[True, False, True, False, False, True]]])
    packed = compact(values, mask)
    torch.testing.assert_close(packed, torch.tensor([[[1.0, 3.0, 6.0]]]))
    slots = torch.tensor([[[True, False, True, True, True]]])  # a gap, then one appended slot
    torch.testing.assert_close(expand_compact(packed, slots), torch.tensor([[[1.0, 0.0, 3.0, 6.0, 0.0]]]))
