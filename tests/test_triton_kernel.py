"""The paged Triton decode kernel against the loop reference, run by the Triton interpreter on CPU."""

from __future__ import annotations

import os
import sys

# Triton decides at import time whether its kernels (its own library functions included) are
# interpreted, and importing torch already imports triton. So the kernels run here only when
# TRITON_INTERPRET=1 was set before triton's import; otherwise one test reruns this file in a fresh
# interpreter with the variable set.
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules
if IN_INTERPRETER:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton); the kernel cannot be tested")

from conftest import rerun_under_triton_interpreter  # noqa: E402

from heterocache.attention.reference import ragged_attention_reference  # noqa: E402
from heterocache.attention.triton import (  # noqa: E402
    dense_as_pages,
    paged_decode_attention,
    pages_from_padded,
    triton_available,
)

interpreted = pytest.mark.skipif(not IN_INTERPRETER, reason="run by test_in_fresh_interpreter")


@pytest.mark.skipif(IN_INTERPRETER, reason="already running under the interpreter")
def test_in_fresh_interpreter():
    rerun_under_triton_interpreter(__file__)


TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def _case(lengths, group, dim=16, dtype=torch.float32, seed=0, new_tokens=1):
    """Random padded sequences + queries, and the reference output ``(n, group * new_tokens, D)``."""
    gen = torch.Generator().manual_seed(seed)
    n, width = len(lengths), max(max(lengths), 1)
    keys = torch.randn((n, width, dim), generator=gen).to(dtype)
    values = torch.randn((n, width, dim), generator=gen).to(dtype)
    query = torch.randn((n, group * new_tokens, dim), generator=gen).to(dtype)
    lens = torch.tensor(lengths)
    # the reference wants (B, Hq, q, D) with per-(b, h) token lists: one batch row, n KV heads
    ref_query = query.view(n, group, new_tokens, dim).reshape(1, n * group, new_tokens, dim)
    ref = ragged_attention_reference(ref_query, [[keys[i, : lengths[i]] for i in range(n)]],
                                     [[values[i, : lengths[i]] for i in range(n)]], dim ** -0.5,
                                     causal_new=new_tokens if new_tokens > 1 else 0)
    ref = ref[0].view(new_tokens, n, group, dim).permute(1, 2, 0, 3).reshape(n, group * new_tokens, dim)
    return query, keys, values, lens, ref


def _shuffled(key_pool, value_pool, table, seed=0):
    """The same pages in a random pool order: the kernel must follow the table, not contiguity."""
    perm = torch.randperm(key_pool.shape[0], generator=torch.Generator().manual_seed(seed))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    return key_pool[perm], value_pool[perm], inverse[table.long()].to(torch.int32)


@interpreted
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_gqa(group, dtype):
    lengths = [1, 17, 40, 16, 5]  # length 1, exact page multiple, non-multiples of the page size
    query, keys, values, lens, ref = _case(lengths, group, dtype=dtype, seed=group)
    key_pool, value_pool, table = _shuffled(*pages_from_padded(keys, values, lens, page_size=16), seed=group)
    out = paged_decode_attention(query, key_pool, value_pool, table, lens, 16 ** -0.5)
    assert out.shape == query.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])


@interpreted
@pytest.mark.parametrize("splits", [2, 3])
def test_split_pages_merge_to_the_same_result(splits):
    lengths = [200, 3, 130, 64]  # up to 4 blocks of 64 tokens; short sequences leave some splits empty
    query, keys, values, lens, ref = _case(lengths, 4, dim=32, seed=7)
    key_pool, value_pool, table = pages_from_padded(keys, values, lens, page_size=16)
    out = paged_decode_attention(query, key_pool, value_pool, table, lens, 32 ** -0.5, num_splits=splits)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


@interpreted
@pytest.mark.parametrize("page_size", [32, 64, 128])
def test_page_sizes(page_size):
    lengths = [1, 65, 100, 31]
    query, keys, values, lens, ref = _case(lengths, 3, seed=page_size)
    key_pool, value_pool, table = _shuffled(*pages_from_padded(keys, values, lens, page_size=page_size))
    out = paged_decode_attention(query, key_pool, value_pool, table, lens, 16 ** -0.5)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


@interpreted
def test_multi_token_decode_is_causal_among_new_tokens():
    lengths = [9, 21, 3]
    query, keys, values, lens, ref = _case(lengths, 3, seed=3, new_tokens=3)
    key_pool, value_pool, table = pages_from_padded(keys, values, lens, page_size=16)
    out = paged_decode_attention(query, key_pool, value_pool, table, lens, 16 ** -0.5, new_tokens=3)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


@interpreted
def test_empty_sequence_gives_zeros_and_head_dim_not_power_of_two():
    lengths = [0, 12, 30]
    query, keys, values, lens, ref = _case(lengths, 2, dim=24, seed=5)
    key_pool, value_pool, table = pages_from_padded(keys, values, lens, page_size=16)
    out = paged_decode_attention(query, key_pool, value_pool, table, lens, 24 ** -0.5)
    assert bool((out[0] == 0).all())
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


@interpreted
def test_zero_copy_view_of_bucket_storage():
    """A cache bucket ``(n, capacity, D)`` with capacity a page multiple is a page pool as is."""
    lengths = [5, 31, 18]
    query, keys, values, lens, ref = _case(lengths, 3, seed=11)
    capacity = 32
    bucket_k = torch.zeros((3, capacity, 16))
    bucket_v = torch.full((3, capacity, 16), 1e4)  # garbage past the lengths must not leak in
    bucket_k[:, : keys.shape[1]], bucket_v[:, : keys.shape[1]] = keys, values
    for i, n in enumerate(lengths):
        bucket_v[i, n:] = 1e4
    key_pool, value_pool, table = dense_as_pages(bucket_k, bucket_v, page_size=16)
    assert key_pool.data_ptr() == bucket_k.data_ptr()
    out = paged_decode_attention(query, key_pool, value_pool, table, lens, 16 ** -0.5)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


@interpreted
def test_pages_from_padded_layout_and_errors():
    keys = torch.arange(2 * 40 * 16, dtype=torch.float32).view(2, 40, 16)
    key_pool, _, table = pages_from_padded(keys, keys, torch.tensor([33, 16]), page_size=16)
    assert key_pool.shape == (3 + 1, 16, 16) and table.dtype == torch.int32
    assert table.tolist() == [[0, 1, 2], [3, 0, 0]]
    torch.testing.assert_close(key_pool[3], keys[1, :16])
    with pytest.raises(ValueError, match="page_size"):
        paged_decode_attention(torch.zeros(1, 1, 16), torch.zeros(1, 8, 16), torch.zeros(1, 8, 16),
                               torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="capacity"):
        dense_as_pages(torch.zeros(2, 20, 16), torch.zeros(2, 20, 16), page_size=16)
    assert triton_available("cpu")  # the interpreter accepts any device
