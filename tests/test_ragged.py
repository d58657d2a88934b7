"""The bucketed (vectorised) ragged attention against the loop reference."""

from __future__ import annotations

import pytest
import torch

from heterocache.attention import decode_attention, plan_buckets
from heterocache.attention.reference import ragged_attention_reference
from heterocache.cache import HeadwiseCache
from heterocache.methods.full import Full


def _append_both(layer, lk, lv, q: int, gen: torch.Generator) -> None:
    """Append ``q`` random tokens to every sequence of ``layer`` and to the reference lists ``lk/lv``."""
    b, h, d = layer.batch, layer.n_kv_heads, layer.head_dim
    new_k = torch.randn((b, h, q, d), generator=gen)
    new_v = torch.randn((b, h, q, d), generator=gen)
    layer.append(new_k, new_v)
    for r in range(b):
        for hh in range(h):
            lk[r][hh] = torch.cat([lk[r][hh], new_k[r, hh]])
            lv[r][hh] = torch.cat([lv[r][hh], new_v[r, hh]])


def _layer_with(lengths, d=8, seed=0, max_buckets=4):
    """A HeadwiseLayer whose (b, h) sequence keeps ``lengths[b][h]`` random tokens."""
    gen = torch.Generator().manual_seed(seed)
    b, h = len(lengths), len(lengths[0])
    total = max(max(row) for row in lengths)
    cache = HeadwiseCache(Full(), 1.0, n_layers=1, n_kv_heads=h, head_dim=d,
                          bucket_options={"max_buckets": max_buckets, "overhead": 4})
    keys = torch.randn((b, h, total, d), generator=gen)
    values = torch.randn((b, h, total, d), generator=gen)
    keep = torch.zeros((b, h, total), dtype=torch.bool)
    for row in range(b):
        for head in range(h):
            chosen = torch.randperm(total, generator=gen)[: lengths[row][head]]
            keep[row, head, chosen] = True
    positions = torch.arange(total).expand(b, h, total)
    layer = cache.layers[0]
    layer.store(keys, values, positions, keep)
    layer.seen = layer.prefill_len = total
    lists_k = [[keys[r, hh][keep[r, hh]] for hh in range(h)] for r in range(b)]
    lists_v = [[values[r, hh][keep[r, hh]] for hh in range(h)] for r in range(b)]
    return layer, lists_k, lists_v


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("q", [1, 3])
def test_bucketed_matches_reference(group, q):
    gen = torch.Generator().manual_seed(group * 10 + q)
    lengths = [[1, 37, 5], [0, 64, 12]]  # includes a length-1 head and an empty head
    layer, lk, lv = _layer_with(lengths)
    b, h, d = 2, 3, 8
    _append_both(layer, lk, lv, q, gen)
    query = torch.randn((b, h * group, q, d), generator=gen)
    fast = decode_attention(query, layer.buckets, layer.n_kv_heads, d ** -0.5)
    ref = ragged_attention_reference(query, lk, lv, d ** -0.5, causal_new=q)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert len(layer.buckets) >= 2  # the lengths differ enough to split


def test_padded_view_round_trip():
    lengths = [[3, 9], [17, 1]]
    layer, lk, lv = _layer_with(lengths, seed=3)
    keys, values, positions, lens = layer.padded()
    assert lens.tolist() == lengths
    for r in range(2):
        for h in range(2):
            n = lengths[r][h]
            torch.testing.assert_close(keys[r, h, :n], lk[r][h])
            torch.testing.assert_close(values[r, h, :n], lv[r][h])
            assert bool((positions[r, h, :n].diff() > 0).all())
            assert bool((positions[r, h, n:] == -1).all())


def test_plan_buckets_groups_similar_lengths():
    lengths = [1000, 1000, 1000, 100, 110, 90, 5]
    groups = plan_buckets(lengths, max_buckets=4, overhead=10)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(lengths)))
    assert [0, 1, 2] in groups  # the long heads share one bucket
    padded_work = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded_work <= 3 * 1000 + 3 * 110 + 5 + 1  # never pays for the longest head everywhere
    assert plan_buckets([7, 7, 7]) == [[0, 1, 2]]
    assert plan_buckets([]) == []


def test_append_is_amortised():
    layer, _, _ = _layer_with([[4, 4]], seed=5)
    reallocations = 0
    bucket = layer.buckets[0]
    capacity = bucket.capacity
    for _ in range(1000):
        layer.append(torch.zeros((1, 2, 1, 8)), torch.zeros((1, 2, 1, 8)))
        if bucket.capacity != capacity:
            reallocations += 1
            capacity = bucket.capacity
    assert int(bucket.lengths[0]) == 1004
    assert reallocations <= 20  # geometric growth: O(log n), not one per append


def _ring_layer(lengths, window, prompt_len=40, d=8, seed=0):
    """A sliding-window HeadwiseLayer whose (b, h) keeps ``lengths[b][h]`` of its last ``window - 1``
    prompt tokens, plus the full history ``{(b, h): [(position, key, value)]}`` of what it stored."""
    gen = torch.Generator().manual_seed(seed)
    b, h = len(lengths), len(lengths[0])
    cache = HeadwiseCache(Full(), 1.0, n_layers=1, n_kv_heads=h, head_dim=d, layer_windows=[window],
                          bucket_options={"max_buckets": 2, "overhead": 4})
    keys = torch.randn((b, h, prompt_len, d), generator=gen)
    values = torch.randn((b, h, prompt_len, d), generator=gen)
    keep = torch.zeros((b, h, prompt_len), dtype=torch.bool)
    history = {}
    for row in range(b):
        for head in range(h):
            reach = torch.arange(prompt_len - window + 1, prompt_len)
            chosen = reach[torch.randperm(len(reach), generator=gen)[: lengths[row][head]]]
            keep[row, head, chosen] = True
            history[(row, head)] = [(int(p), keys[row, head, p], values[row, head, p]) for p in sorted(chosen.tolist())]
    layer = cache.layers[0]
    layer.store(keys, values, torch.arange(prompt_len).expand(b, h, prompt_len), keep)
    layer.seen = layer.prefill_len = prompt_len
    return layer, history


def test_ring_attention_matches_reference_with_wraps_and_multi_token_steps():
    window, group, d = 6, 2, 8
    gen = torch.Generator().manual_seed(7)
    layer, history = _ring_layer([[5, 2], [0, 3]], window, d=d)
    b, h = 2, 2
    widest = 1
    for q in (1, 1, 3, 1, 1, 1, 4, 1, 1):
        widest = max(widest, q)
        new_k, new_v = torch.randn((b, h, q, d), generator=gen), torch.randn((b, h, q, d), generator=gen)
        first = layer.seen
        layer.append(new_k, new_v)
        layer.seen += q
        for (row, head), items in history.items():
            items.extend((first + t, new_k[row, head, t], new_v[row, head, t]) for t in range(q))
        query = torch.randn((b, h * group, q, d), generator=gen)
        fast = decode_attention(query, layer.buckets, h, d ** -0.5, first_query=first)
        for t in range(q):  # the loop reference over exactly the tokens query t may see
            p = first + t
            visible = [[[(k, v) for pos, k, v in history[(row, head)] if p - window < pos <= p] for head in range(h)]
                       for row in range(b)]
            lk = [[torch.stack([k for k, _ in hv]) for hv in rv] for rv in visible]
            lv = [[torch.stack([v for _, v in hv]) for hv in rv] for rv in visible]
            ref = ragged_attention_reference(query[:, :, t:t + 1], lk, lv, d ** -0.5)
            torch.testing.assert_close(fast[:, t:t + 1], ref, rtol=1e-5, atol=1e-5)
        # W slots in single-token decode; a q-token forward needs (and keeps) W - 1 + q
        assert all(bk.capacity <= window - 1 + widest for bk in layer.buckets)
        keys, _, positions, lengths = layer.padded()
        for row in range(b):
            for head in range(h):
                n = int(lengths[row, head])
                assert bool((positions[row, head, :n].diff() > 0).all())  # ascending even after wrapping
                last = {pos: k for pos, k, _ in history[(row, head)]}
                for j in range(n):
                    torch.testing.assert_close(keys[row, head, j], last[int(positions[row, head, j])])


def test_ring_never_grows_in_single_token_decode():
    layer, _ = _ring_layer([[7, 7]], window=8)
    for _ in range(50):
        layer.append(torch.zeros((1, 2, 1, 8)), torch.zeros((1, 2, 1, 8)))
        layer.seen += 1
    assert [bk.capacity for bk in layer.buckets] == [8]
    assert layer.padded()[2][0, 0].tolist() == list(range(82, 90))  # the last W positions


def test_many_decode_steps_match_reference_and_eager_positions():
    """Lazy positions and the cached single-token key mask against the loop oracle and eager bookkeeping,
    through growth (reallocation) and a multi-token step."""
    from heterocache.attention.ragged import key_mask

    gen = torch.Generator().manual_seed(11)
    lengths = [[1, 37, 5], [0, 64, 12]]
    layer, lk, lv = _layer_with(lengths)
    b, h, d, group = 2, 3, 8, 3
    _, _, start_positions, _ = layer.padded()
    expected_positions = [[start_positions[r, hh][start_positions[r, hh] >= 0].tolist() for hh in range(h)]
                          for r in range(b)]
    for q in [1] * 40 + [3] + [1] * 30:
        _append_both(layer, lk, lv, q, gen)
        for r in range(b):
            for hh in range(h):
                expected_positions[r][hh] += list(range(layer.seen, layer.seen + q))
        layer.seen += q
        for bucket in layer.buckets:
            if not bucket.uniform:
                mask = bucket.key_mask(q, group)
                visible = mask if mask.dtype == torch.bool else mask == 0  # additive in single-token steps
                assert torch.equal(visible.expand(-1, -1, group * q, -1),
                                   key_mask(bucket.lengths, bucket.max_len, q, group, False))
        query = torch.randn((b, h * group, q, d), generator=gen)
        fast = decode_attention(query, layer.buckets, layer.n_kv_heads, d ** -0.5)
        ref = ragged_attention_reference(query, lk, lv, d ** -0.5, causal_new=q)
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    _, _, positions, lens = layer.padded()
    for r in range(b):
        for hh in range(h):
            assert positions[r, hh, : int(lens[r, hh])].tolist() == expected_positions[r][hh]
    assert positions.dtype == torch.long


def test_storage_overhead_is_small_and_accounted():
    """Headroom + bucket padding stay a small share of what is held; stats split them exactly."""
    lengths = [[300, 300, 290], [310, 3000, 305]]
    layer, _, _ = _layer_with(lengths, d=64)
    cache = layer.cache
    cache.prompt_lengths = torch.tensor([3000, 3000])
    stats = cache.stats()
    assert stats["device_bytes"] == stats["device_used_bytes"] + stats["device_overhead_bytes"]
    assert stats["device_overhead_bytes"] == stats["device_headroom_bytes"] + stats["device_padding_bytes"]
    ideal = sum(map(sum, lengths)) * (2 * 64 * 4)  # fp32 keys + values of the kept tokens
    assert stats["device_bytes"] <= 1.1 * ideal
