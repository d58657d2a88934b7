"""The block refill without host syncs (retrieval/syncfree.py) against swap_blocks's nonzero pairing."""

from __future__ import annotations

import pytest
import torch
from conftest import slot_state, tiny_model

import heterocache as hc
from heterocache.retrieval.syncfree import fetch_blocks_reference, pair_blocks

KEEP = 0.25


def _random_state(n=5, pages=12, width=4, seed=0):
    return slot_state(n, pages, width, seed)


def _nonzero_pairing(resident, current, chosen):
    """What swap_blocks pairs: the k-th incoming page (ascending) of a row with its k-th free slot."""
    wanted = torch.zeros_like(resident).scatter_(1, chosen, True)
    incoming = torch.nonzero(wanted > resident)
    free = torch.nonzero(~wanted.gather(1, current))
    return wanted, sorted(zip(incoming[:, 0].tolist(), incoming[:, 1].tolist(), free[:, 1].tolist()))


@pytest.mark.parametrize("seed", range(6))
def test_pairing_equals_the_nonzero_pairing(seed):
    resident, current, chosen = _random_state(seed=seed)
    wanted, src, dst, valid = pair_blocks(resident, current, chosen)
    expected_wanted, expected = _nonzero_pairing(resident, current, chosen)
    got = sorted((r, int(src[r, j]), int(dst[r, j])) for r in range(src.shape[0]) for j in range(src.shape[1])
                 if valid[r, j])
    assert torch.equal(wanted, expected_wanted)
    assert got == expected
    for r in range(dst.shape[0]):  # dst is a permutation of the row's slots: no slot written twice
        assert sorted(dst[r].tolist()) == list(range(dst.shape[1]))


def test_pairing_with_nothing_new_and_everything_new():
    resident, current, _ = _random_state(n=2, pages=8, width=3, seed=1)
    _, _, _, valid = pair_blocks(resident, current, current.flip(1))  # the same pages again
    assert not valid.any()
    outside = torch.stack([torch.nonzero(~resident[i]).flatten()[:3] for i in range(2)])
    _, src, _, valid = pair_blocks(resident, current, outside)
    assert valid.all() and torch.equal(src, outside.sort(1).values)


def test_fetch_reference_writes_only_the_valid_pairs():
    resident, current, chosen = _random_state(n=3, pages=6, width=3, seed=2)
    _, src, dst, valid = pair_blocks(resident, current, chosen)
    unit, d, slots = 2, 4, 5  # slots per row >= width: the storage has other tokens after the dynamic ones
    tier_k = torch.randn(3 * 6, unit * d)
    tier_v = torch.randn(3 * 6, unit * d)
    positions = torch.arange(3 * 6 * unit).view(3 * 6, unit)
    out_k, out_v = torch.randn(3 * slots, unit * d), torch.randn(3 * slots, unit * d)
    out_p = torch.full((3 * slots, unit), -1, dtype=torch.int32)
    expect_k, expect_v, expect_p = out_k.clone(), out_v.clone(), out_p.clone()
    for r in range(3):
        for j in range(3):
            if valid[r, j]:
                s, t = r * 6 + int(src[r, j]), r * slots + int(dst[r, j])
                expect_k[t], expect_v[t], expect_p[t] = tier_k[s], tier_v[s], positions[s].int()
    fetch_blocks_reference(tier_k, tier_v, positions, out_k, out_v, out_p, src, dst, valid)
    assert torch.equal(out_k, expect_k) and torch.equal(out_v, expect_v) and torch.equal(out_p, expect_p)
    out_v2, expect_v2 = torch.zeros_like(out_v), torch.zeros_like(out_v)
    for r in range(3):
        for j in range(3):
            if valid[r, j]:
                expect_v2[r * slots + int(dst[r, j])] = tier_v[r * 6 + int(src[r, j])]
    fetch_blocks_reference(None, tier_v, positions, None, out_v2, out_p.clone(), src, dst, valid)  # values only
    assert torch.equal(out_v2, expect_v2) and valid.any()


def _run(model, ids, sync_free, steps=8, method="heterocache", **options):
    if method == "heterocache":
        options.setdefault("refill", "torch")
    cache = hc.make_cache(model, method, KEEP, **options)
    engine = cache.method.runtime.engine if method == "heterocache" else cache.method.engine
    engine.sync_free = sync_free
    paths = []
    original = engine.swap_blocks_sync_free

    def spy(layer, slots, chosen, path):
        paths.append(path)
        original(layer, slots, chosen, path)

    engine.swap_blocks_sync_free = spy
    out = model.generate(ids, **hc.cache_kwargs(cache, model), max_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits), cache.stats(), paths


@pytest.mark.parametrize("prefetch", ["none", "speculate"])
def test_decode_through_the_sync_free_swap_equals_the_default(prefetch):
    """Same tokens, logits, bytes (critical / prefetched split too) and tokens fetched as swap_blocks."""
    model = tiny_model("llama", layers=3)
    ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(3))
    for drift in (0.0, 0.3):
        base = _run(model, ids, False, refresh_drift=drift, prefetch=prefetch)
        free = _run(model, ids, True, refresh_drift=drift, prefetch=prefetch)
        assert base[3] == [] and free[3] and set(free[3]) == {"torch"}
        assert torch.equal(base[0], free[0])
        assert torch.allclose(base[1], free[1], atol=1e-6)
        for key in ("retrieval_bytes", "retrieval_critical_bytes", "retrieval_prefetched_bytes",
                    "retrieval_tokens"):
            assert base[2][key] == free[2][key], key
        assert free[2]["retrieval_bytes"] > 0


@pytest.mark.parametrize("method", ["quest"])  # OmniKV fills its sparse layers token by token
def test_the_retrieval_peers_through_the_sync_free_swap_equal_the_default(method):
    model = tiny_model("llama", layers=4)
    ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(5))
    base, free = _run(model, ids, False, method=method), _run(model, ids, True, method=method)
    assert free[3] and set(free[3]) == {"torch"}
    assert torch.equal(base[0], free[0]) and torch.allclose(base[1], free[1], atol=1e-6)
    assert base[2]["retrieval_bytes"] == free[2]["retrieval_bytes"] > 0
    assert base[2]["retrieval_tokens"] == free[2]["retrieval_tokens"]


def test_the_cpu_default_keeps_the_nonzero_swap():
    model = tiny_model("llama", layers=2)
    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(3))
    cache = hc.make_cache(model, "heterocache", KEEP, refill="torch")
    engine = cache.method.runtime.engine
    model.generate(ids, **hc.cache_kwargs(cache, model), max_new_tokens=2, do_sample=False)
    slots = next(iter(engine.layers.values()))
    assert engine.sync_free is None and engine.sync_free_path(cache.layers[0], slots) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it)")
def test_cuda_decode_refills_without_a_host_sync():
    """On CUDA the refill of a decode step raises under ``set_sync_debug_mode('error')`` if anything in it
    waits for the device; the tokens equal the nonzero swap's."""
    model = tiny_model("llama", layers=3).cuda()
    ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(3)).cuda()
    base = _run(model, ids, False, refresh_drift=0.0)
    cache = hc.make_cache(model, "heterocache", KEEP, refresh_drift=0.0)
    runtime = cache.method.runtime
    original = runtime.refill

    def strict(layer, queries, prefetched=False):
        torch.cuda.set_sync_debug_mode("error")
        try:
            original(layer, queries, prefetched)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    runtime.refill = strict
    out = model.generate(ids, **hc.cache_kwargs(cache, model), max_new_tokens=8, do_sample=False)
    assert torch.equal(out, base[0])
    assert cache.stats()["retrieval_bytes"] == base[2]["retrieval_bytes"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it)")
def test_cuda_kernel_reads_pinned_host_pages():
    """The Triton copy on CUDA with the tier in pinned host memory equals the reference on the CPU."""
    from heterocache.retrieval.syncfree import fetch_blocks

    resident, current, chosen = _random_state(n=4, pages=16, width=6, seed=7)
    _, src, dst, valid = pair_blocks(resident, current, chosen)
    unit, d, slots = 4, 64, 9
    gen = torch.Generator().manual_seed(0)
    tier = [torch.randn(4 * 16, unit * d, generator=gen).to(torch.bfloat16).pin_memory() for _ in range(2)]
    positions = torch.arange(4 * 16 * unit).view(4 * 16, unit)
    out = [torch.randn(4 * slots, unit * d, generator=gen).to(torch.bfloat16) for _ in range(2)]
    out_p = torch.zeros(4 * slots, unit, dtype=torch.int32)
    ref = [t.clone() for t in out] + [out_p.clone()]
    fetch_blocks_reference(tier[0], tier[1], positions, *ref, src, dst, valid)
    got = [t.cuda() for t in out] + [out_p.cuda()]
    fetch_blocks(tier[0], tier[1], positions.cuda(), *got, src.cuda(), dst.cuda(), valid.cuda())
    for a, b in zip(ref, got):
        assert torch.equal(a, b.cpu())
