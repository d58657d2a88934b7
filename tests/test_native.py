"""The fused C refill (heterocache/native/refill.c) against its PyTorch reference (``choose`` +
``DynamicRetrieval._swap_blocks``): same pages held, same bytes moved, same logits."""

from __future__ import annotations

import ctypes

import pytest
import torch
from conftest import left_padded_batch, tiny_model

import heterocache as hc
from heterocache import native
from heterocache.hf import cache_kwargs


def test_the_native_library_builds_here():
    """CI machines have a C compiler: the fast path must be available there, not silently absent."""
    assert native.refill_library() is not None, native.unavailable_reason()


def _decode(model, ids, steps: int, **options):
    cache = hc.make_cache(model, "heterocache", 0.25, window=8, sinks=2, **options)
    rows = []
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache, model))
        for _ in range(steps):  # past the prefill headroom: the buckets grow, unit-aligned
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, **cache_kwargs(cache, model))
            rows.append(out.logits[:, -1])
    runtime = cache.method.runtime
    held = [sorted(layer.padded()[2][b, h, : layer.padded()[3][b, h]].tolist()) for layer in cache.layers
            for b in range(ids.shape[0]) for h in range(layer.n_kv_heads)]
    stats = cache.stats()
    return torch.cat(rows), held, runtime, stats


@pytest.mark.parametrize("index,summary_dtype,batch,page_score,dtype", [
    ("sketch", "int8", 1, "lse", "float32"), ("sketch", "int8", 1, "max", "float32"),
    ("sketch", "float32", 1, "lse", "float32"), ("pages", "int8", 1, "lse", "float32"),
    ("pages", "float32", 1, "lse", "float32"), ("sketch", "int8", 2, "lse", "float32"),
    ("pages", "int8", 1, "lse", "bfloat16"), ("sketch", "int8", 2, "lse", "bfloat16")])
def test_native_refill_matches_the_torch_blocks(index, summary_dtype, batch, page_score, dtype):
    """``stick`` stays 0 here: with a bonus, pages tie exactly at the bonus (each query row's best page
    scores 0) and tied pages are chosen differently (C: lower page first; ``torch.topk``: unspecified).
    A bf16 cache: the C routine copies bf16 pages from a bf16 tier and scores fp32 queries, as PyTorch does."""
    model = tiny_model("llama", layers=2, heads=6, kv_heads=2).to(getattr(torch, dtype))  # 3 query rows per KV head
    ids = torch.randint(0, 128, (batch, 300), generator=torch.Generator().manual_seed(3))
    # refresh_drift 0: every step refills (the gate is compared in test_native_drift_gate_matches_the_torch_one)
    options = {"index": index, "rank": 3, "page": 4, "summary_dtype": summary_dtype, "page_score": page_score,
               "refresh_drift": 0.0}
    fast = _decode(model, ids, 24, refill="native", **options)
    slow = _decode(model, ids, 24, refill="torch", **options)
    uniform = [layer for layer, slots in fast[2].layers.items() if slots.uniform]
    assert uniform, "no layer in the block layout: the test compares nothing"
    assert all(fast[2].layers[i].native and fast[2].layers[i].blocks for i in uniform)
    assert not any(slots.native for slots in slow[2].layers.values())
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-5)
    assert fast[1] == slow[1]  # the same prompt positions held by every head
    for name in ("retrieval_tokens", "retrieval_bytes", "retrieval_refreshes"):
        assert fast[3][name] == slow[3][name], name
    assert fast[3]["retrieval_tokens"] > 0  # pages did move


def test_native_drift_gate_matches_the_torch_one():
    """``refresh_drift`` > 0: the C routine and the PyTorch path skip the same sequences at the same
    steps (same held pages, bytes, skip counts, logits)."""
    model = tiny_model("llama", layers=2, heads=6, kv_heads=2)
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(3))
    options = {"rank": 3, "page": 4, "refresh_drift": 0.3}
    fast = _decode(model, ids, 24, refill="native", **options)
    slow = _decode(model, ids, 24, refill="torch", **options)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-5)
    assert fast[1] == slow[1]
    for name in ("retrieval_tokens", "retrieval_bytes", "retrieval_checked", "retrieval_skipped"):
        assert fast[3][name] == slow[3][name], name
    assert 0 < fast[3]["retrieval_skipped"] < fast[3]["retrieval_checked"]


@pytest.mark.parametrize("index,lengths", [("sketch", [300, 220, 140]), ("pages", [300, 220, 140]),
                                           ("sketch", [600, 300, 120])])  # one ragged bucket / two buckets
def test_native_refill_of_ragged_rows_matches_the_token_swap(index, lengths):
    """Batch rows of different lengths (different budgets, several buckets): no block layout, so the
    C refill works on unit slots it gives each row (``_row_layout``); the reference is the
    token-by-token swap on the unmoved layout."""
    model = tiny_model("llama", layers=2, heads=6, kv_heads=2)
    ids, mask = left_padded_batch(lengths, seed=7)
    out = {}
    for refill in ("native", "torch"):
        # keep 0.5: every row holds more pages than there are query rows (3); with fewer, the rows' best
        # pages (each scoring exactly 0) tie at the cut, and torch.topk and the C selection break ties
        # differently
        cache = hc.make_cache(model, "heterocache", 0.5, window=8, sinks=2, index=index, rank=3, page=4,
                              refill=refill)
        with torch.no_grad():
            # token 0 is the padding id (also fed to rows that finished), whose embedding is zero: its
            # queries score every page alike, so it must never come
            generated = model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), max_new_tokens=20,
                                       min_new_tokens=20, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True, suppress_tokens=[0])
        runtime = cache.method.runtime
        held = [sorted(layer.padded()[2][b, h, : layer.padded()[3][b, h]].tolist()) for layer in cache.layers
                for b in range(3) for h in range(layer.n_kv_heads)]
        out[refill] = (torch.stack(generated.logits), held, cache.stats(), runtime)
    fast, slow = out["native"], out["torch"]
    assert all(slots.native and not slots.blocks for slots in fast[3].layers.values())
    assert len(cache.layers[0].buckets) == (2 if lengths[0] == 600 else 1)
    assert not any(slots.native for slots in slow[3].layers.values())
    counts = [int(c) for slots in fast[3].layers.values() for c in slots.counts]
    assert len(set(counts)) > 1 and min(counts) > 3  # really ragged; no tie at the cut (see above)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-5)
    assert fast[1] == slow[1]
    for name in ("retrieval_tokens", "retrieval_bytes", "retrieval_refreshes"):
        assert fast[2][name] == slow[2][name], name
    assert fast[2]["retrieval_tokens"] > 0


def test_native_refill_holds_the_top_pages_of_a_constructed_query():
    """Rank = D sketch (exact scores), one query that points at three known pages: after one refill
    the dynamic slots hold exactly those pages, copied bit-exact from the tier."""
    from heterocache.methods.heterocache.dynamic import choose
    from heterocache.retrieval.index import SummaryIndex, key_sketch
    from heterocache.retrieval.slots import PagedSlots, to_blocks

    gen = torch.Generator().manual_seed(1)
    n, pages, page, d, width = 2, 12, 4, 8, 3
    keys = torch.randn(n, pages * page, d, generator=gen) * 0.1
    queries = torch.zeros(n, 1, d)
    queries[:, 0, 0] = 10.0
    targets = [[2, 7, 11], [0, 5, 9]]
    for row, wanted in enumerate(targets):
        for p in wanted:
            keys[row, p * page + 1, 0] = 3.0 + p  # one token per target page stands out
    sketch, basis = key_sketch(keys, torch.ones(n, pages * page, dtype=torch.bool), d)
    summaries = sketch.view(n, pages, page, d).transpose(1, 2).reshape(n, -1, d).transpose(1, 2).contiguous()
    values = torch.randn(n, pages * page, d, generator=gen)
    resident = torch.zeros(n, pages, dtype=torch.bool)
    resident[:, 3:6] = True  # pages 3, 4, 5 are in the unit slots now
    current = torch.tensor([[3, 4, 5], [3, 4, 5]])
    capacity = width * page + 4
    bucket_keys = torch.zeros(n, capacity, d)
    bucket_values = torch.zeros(n, capacity, d)
    bucket_positions = torch.full((n, capacity), -1, dtype=torch.int32)
    positions = torch.arange(pages * page).view(1, pages, page).expand(n, -1, -1).contiguous()
    for slot, p in enumerate(current[0].tolist()):  # the bucket holds the resident pages
        bucket_keys[:, slot * page:(slot + 1) * page] = keys[:, p * page:(p + 1) * page]
        bucket_values[:, slot * page:(slot + 1) * page] = values[:, p * page:(p + 1) * page]
        bucket_positions[:, slot * page:(slot + 1) * page] = torch.arange(p * page, (p + 1) * page)

    def slots():
        index = SummaryIndex("sketch", summaries, basis.contiguous(), None, 1.0, page, channels=d)
        return PagedSlots(seq=[0, 1], resident=resident.clone(), counts=torch.full((n,), width), width=width,
                          base=torch.zeros(n, pages), length=pages * page, unit=page, page_positions=positions,
                          current=current.clone(), index=index)

    reference = slots()
    assert [sorted(r) for r in choose(reference, queries, 0.0).tolist()] == targets
    fast = slots()
    counts = torch.full((n,), width)
    seq_bucket, seq_row = torch.zeros(n, dtype=torch.long), torch.arange(n)
    buckets = (ctypes.c_int64 * 4)(bucket_keys.data_ptr(), bucket_values.data_ptr(), bucket_positions.data_ptr(),
                                   capacity)
    blocks = to_blocks(summaries, page, native.refill_library().hc_block())  # the C routine's index layout
    job = native.RefillJob(
        n=n, rows=1, dim=d, channels=d, pages=pages, group=page, queries=queries.data_ptr(),
        qmat=fast.index.basis.data_ptr(), alpha=1.0, summaries=blocks.data_ptr(), summary_int8=0,
        base=fast.base.data_ptr(), stick=0.0, page_lse=0, resident=fast.resident.data_ptr(), width=width,
        counts=counts.data_ptr(), current=fast.current.data_ptr(), tier_keys=keys.data_ptr(),
        tier_values=values.data_ptr(), token_bytes=d * 4, page_positions=positions.data_ptr(), unit=page,
        seq_bucket=seq_bucket.data_ptr(), seq_row=seq_row.data_ptr(), nbuckets=1, buckets=ctypes.addressof(buckets))
    moved = native.refill_library().hc_refill(ctypes.byref(job))
    assert moved == 2 * width - 1  # page 5 of row 1 was resident already: it stays in its slot
    assert fast.current[1, 2] == 5
    for row, wanted in enumerate(targets):
        assert sorted(fast.current[row].tolist()) == wanted
        assert torch.nonzero(fast.resident[row]).flatten().tolist() == wanted
        for slot, p in enumerate(fast.current[row].tolist()):
            block = slice(slot * page, (slot + 1) * page)
            assert torch.equal(bucket_keys[row, block], keys[row, p * page:(p + 1) * page])
            assert torch.equal(bucket_values[row, block], values[row, p * page:(p + 1) * page])
            assert bucket_positions[row, block].tolist() == list(range(p * page, (p + 1) * page))
    assert bool((bucket_positions[:, width * page:] == -1).all())  # nothing written past the unit slots


def test_refill_native_says_why_it_cannot_run():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="refill='native' cannot be used here: the disk tier"):
        _decode(model, ids, 2, refill="native", offload="disk")
    with pytest.raises(ValueError, match="reads int8 or float32 indexes, not torch.bfloat16"):
        _decode(model, ids, 2, refill="native", summary_dtype="bfloat16")
    with pytest.raises(ValueError, match="refill='fast'"):
        hc.make_cache(model, "heterocache", 0.25, refill="fast")
    _decode(model, ids, 2, refill="auto", offload="disk")  # auto: the PyTorch path instead


def test_without_the_library_auto_falls_back_and_native_says_why(monkeypatch):
    """No compiler (here: HETEROCACHE_NATIVE=0): refill='auto' runs the PyTorch ops and leaves the
    storage layout alone (ragged rows keep the token swap, same logits as refill='torch');
    refill='native' is an error naming the reason."""
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setenv("HETEROCACHE_NATIVE", "0")
    model = tiny_model("llama", layers=2, heads=6, kv_heads=2)
    ids, mask = left_padded_batch([300, 220, 140], seed=7)
    logits = {}
    for refill in ("auto", "torch"):
        cache = hc.make_cache(model, "heterocache", 0.5, window=8, sinks=2, rank=3, page=4, refill=refill)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), max_new_tokens=5,
                                 min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 suppress_tokens=[0])
        assert not any(slots.native for slots in cache.method.runtime.layers.values())
        logits[refill] = torch.stack(out.logits)
    assert torch.equal(logits["auto"], logits["torch"])
    with pytest.raises(ValueError, match="refill='native' cannot be used here: disabled by HETEROCACHE_NATIVE=0"):
        _decode(model, ids[:1], 2, refill="native")


def _random_refill(library, rows: int, pages: int, int8: bool, lse: bool, seed: int):
    """One C refill on a random sketch index (``pages`` pages of 8 tokens, rank 16, 3 sequences)
    against ``choose``: the same pages wanted per sequence, each incoming page copied bit-exact into a
    freed unit slot."""
    from heterocache.methods.heterocache.dynamic import choose
    from heterocache.retrieval.index import SummaryIndex
    from heterocache.retrieval.slots import PagedSlots, to_blocks

    gen = torch.Generator().manual_seed(seed)
    n, d, rank, page, width = 3, 32, 16, 8, max(2, pages // 5)
    queries = torch.randn(n, rows, d, generator=gen)
    basis = torch.randn(n, d, rank, generator=gen) / d ** 0.5
    if int8:
        summaries = torch.randint(-127, 128, (n, rank, page * pages), dtype=torch.int8, generator=gen)
        scale = torch.rand(n, 1, rank, generator=gen) * 0.02 + 0.01
    else:
        summaries, scale = torch.randn(n, rank, page * pages, generator=gen), None
    base = torch.zeros(n, pages)
    base[:, 1] = float("-inf")  # a padding page is never chosen
    resident = torch.zeros(n, pages, dtype=torch.bool)
    current = torch.stack([torch.randperm(pages - 2, generator=gen)[:width] + 2 for _ in range(n)])
    resident.scatter_(1, current, True)
    keys = torch.randn(n * pages, page * d, generator=gen)
    values = torch.randn(n * pages, page * d, generator=gen)
    positions = torch.arange(n * pages * page).view(n, pages, page)
    capacity = width * page + 5
    storage = [torch.zeros(n, capacity, d), torch.zeros(n, capacity, d), torch.full((n, capacity), -1, dtype=torch.int32)]
    index = SummaryIndex("sketch", summaries, basis, scale, 1.0, page, page_lse=lse, channels=rank)
    common = dict(seq=list(range(n)), counts=torch.full((n,), width), width=width, base=base, length=pages * page,
                  unit=page, page_positions=positions, index=index)
    reference = PagedSlots(resident=resident.clone(), **common)
    wanted = [sorted(r) for r in choose(reference, queries, 0.0).tolist()]
    fast = PagedSlots(resident=resident.clone(), current=current.clone(), **common)
    counts = torch.full((n,), width)
    seq_bucket, seq_row = torch.zeros(n, dtype=torch.long), torch.arange(n)
    buckets = (ctypes.c_int64 * 4)(*[t.data_ptr() for t in storage], capacity)
    blocks = to_blocks(summaries, page, library.hc_block())
    job = native.RefillJob(
        n=n, rows=rows, dim=d, channels=rank, pages=pages, group=page, queries=queries.data_ptr(),
        qmat=basis.data_ptr(), qscale=None if scale is None else scale.data_ptr(), alpha=1.0,
        summaries=blocks.data_ptr(), summary_int8=int(int8), base=base.data_ptr(), stick=0.0, page_lse=int(lse),
        resident=fast.resident.data_ptr(), width=width, counts=counts.data_ptr(), current=fast.current.data_ptr(),
        tier_keys=keys.data_ptr(), tier_values=values.data_ptr(), token_bytes=d * 4, page_positions=positions.data_ptr(),
        unit=page, seq_bucket=seq_bucket.data_ptr(), seq_row=seq_row.data_ptr(), nbuckets=1,
        buckets=ctypes.addressof(buckets))
    moved = library.hc_refill(ctypes.byref(job))
    incoming = [sorted(set(w) - set(torch.nonzero(resident[i]).flatten().tolist())) for i, w in enumerate(wanted)]
    assert moved == sum(len(x) for x in incoming) > 0
    for i in range(n):
        assert torch.nonzero(fast.resident[i]).flatten().tolist() == wanted[i]
        assert sorted(fast.current[i].tolist()) == wanted[i]
        for slot, p in enumerate(fast.current[i].tolist()):
            if p in incoming[i]:
                block = slice(slot * page, (slot + 1) * page)
                assert torch.equal(storage[0][i, block].reshape(-1), keys[i * pages + p])
                assert torch.equal(storage[1][i, block].reshape(-1), values[i * pages + p])
                assert storage[2][i, block].tolist() == positions[i, p].tolist()


@pytest.mark.parametrize("kernel", ["default", "portable"])
@pytest.mark.parametrize("rows,pages,int8,lse", [(3, 200, True, True), (3, 200, True, False), (1, 77, False, True),
                                                  (5, 130, False, False), (4, 64, True, True), (2, 13, True, True)])
def test_native_scoring_kernels_match_choose_on_random_indexes(kernel, rows, pages, int8, lse):
    """Both scoring kernels (AVX2 where the CPU has it, and the portable loops: ``-DHC_PORTABLE``) on
    several blocks of pages with a partial last block and vector (200 = 3 x 64 + 8, 77, 130, 13 pages),
    1 to 5 query rows (the 1-4 row kernels, and 5 = 4 + 1), int8 / fp32 index, lse / max."""
    library = native.refill_library()
    if kernel == "portable":
        library = native.library_built_with(native.FLAG_SETS[0] + ["-DHC_PORTABLE"])
        assert library.hc_kernel() == b"portable"
    for seed in range(3):
        _random_refill(library, rows, pages, int8, lse, seed)


def test_block_layout_round_trip():
    from heterocache.retrieval.slots import from_blocks, to_blocks

    summaries = torch.randint(-127, 128, (2, 5, 8 * 150), dtype=torch.int8)
    blocks = to_blocks(summaries, 8, 64)
    assert blocks.shape == (2, 5 * 8 * 150)  # no padding: the same bytes
    assert torch.equal(blocks[0, : 8 * 5 * 64].view(8, 5, 64)[3, 2], summaries[0, 2, 3 * 150: 3 * 150 + 64])
    assert torch.equal(from_blocks(blocks, 5, 8, 64), summaries)


@pytest.mark.parametrize("kernel", ["default", "portable"])
def test_native_selection_breaks_exact_ties_by_lower_page(kernel):
    """Small-integer pages index and queries: every score is an exact integer in both C and PyTorch, so
    many pages tie at the cut; the C selection takes the best scores, ties to the lower page (the order
    of a stable descending sort), through every radix pass."""
    from heterocache.methods.heterocache.dynamic import unit_scores
    from heterocache.retrieval.index import SummaryIndex
    from heterocache.retrieval.slots import PagedSlots, to_blocks

    library = native.refill_library() if kernel == "default" else native.library_built_with(
        native.FLAG_SETS[0] + ["-DHC_PORTABLE"])
    gen = torch.Generator().manual_seed(5)
    n, rows, d, pages, width = 3, 3, 16, 300, 70
    queries = torch.randint(-1, 2, (n, rows, d), generator=gen).float()
    summaries = torch.randint(-2, 3, (n, d, pages), generator=gen).float()
    base = torch.zeros(n, pages)
    resident = torch.zeros(n, pages, dtype=torch.bool)
    resident[:, :width] = True
    slots = PagedSlots(seq=[0, 1, 2], resident=resident.clone(), counts=torch.full((n,), width), width=width,
                       base=base, length=pages, unit=1, index=SummaryIndex("pages", summaries, None, None, 1.0, 1,
                                                                           channels=d),
                       page_positions=torch.arange(n * pages).view(n, pages, 1), current=torch.arange(width).repeat(n, 1))
    score = unit_scores(slots, queries, 0.0)
    assert len(set(score[0].tolist())) < pages // 10  # ties everywhere
    wanted = [sorted(torch.sort(s, descending=True, stable=True).indices[:width].tolist()) for s in score]
    cut = [s.sort(descending=True).values[width - 1] for s in score]
    assert all(int((s == c).sum()) > 1 for s, c in zip(score, cut))  # a tie straddles the cut
    storage = [torch.zeros(n, width, d), torch.zeros(n, width, d), torch.zeros(n, width, dtype=torch.int32)]
    tier = torch.randn(n * pages, d, generator=gen)
    counts, seq_bucket, seq_row = torch.full((n,), width), torch.zeros(n, dtype=torch.long), torch.arange(n)
    buckets = (ctypes.c_int64 * 4)(*[t.data_ptr() for t in storage], width)
    blocks = to_blocks(summaries, 1, library.hc_block())
    job = native.RefillJob(
        n=n, rows=rows, dim=d, channels=d, pages=pages, group=1, queries=queries.data_ptr(), alpha=1.0,
        summaries=blocks.data_ptr(), summary_int8=0, base=base.data_ptr(), stick=0.0, page_lse=1,
        resident=slots.resident.data_ptr(), width=width, counts=counts.data_ptr(), current=slots.current.data_ptr(),
        tier_keys=tier.data_ptr(), tier_values=tier.data_ptr(), token_bytes=d * 4,
        page_positions=slots.page_positions.data_ptr(), unit=1, seq_bucket=seq_bucket.data_ptr(),
        seq_row=seq_row.data_ptr(), nbuckets=1, buckets=ctypes.addressof(buckets))
    assert library.hc_refill(ctypes.byref(job)) > 0
    assert [torch.nonzero(r).flatten().tolist() for r in slots.resident] == wanted


def test_slots_are_laid_out_at_the_end_of_the_prefill():
    """``after_store``: the slot mapping (and the index's block layout) happens when each layer stores
    its prefill, so decode steps only refill; nothing is mapped again while no layer stores."""
    model = tiny_model("llama", layers=2, heads=6, kv_heads=2)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(3))
    cache = hc.make_cache(model, "heterocache", 0.25, window=8, sinks=2, rank=3, page=4)
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache, model))
        runtime = cache.method.runtime
        assert all(slots.native and slots.index.summary_block for slots in runtime.layers.values())
        mapped = cache.stats()["retrieval_layout_s"]
        assert mapped > 0
        for _ in range(12):  # past the prefill headroom: the buckets grow
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(cache, model))
    stats = cache.stats()
    assert stats["retrieval_layout_s"] == mapped and stats["retrieval_refreshes"] == 2 * 12


def test_the_build_folder_follows_HETEROCACHE_CACHE_DIR(tmp_path, monkeypatch):
    """One variable names the cache root for models, profiles and native builds alike."""
    import os

    from heterocache.models import cache_root

    monkeypatch.setenv("HETEROCACHE_CACHE", str(tmp_path / "old-name"))  # the former variable: ignored
    monkeypatch.setenv("HETEROCACHE_CACHE_DIR", str(tmp_path / "root"))
    assert native.cache_dir() == cache_root() / "native" == tmp_path / "root" / "native"
    built = native._build(os.environ.get("CC", "cc"), flag_sets=(["-O0", "-fPIC", "-shared"],))
    assert built.is_file() and built.parent.parent == tmp_path / "root" / "native"
    assert not (tmp_path / "old-name").exists()
