"""Paged ragged decode attention in Triton (the GPU fast path; tested on CPU with ``TRITON_INTERPRET=1``).

Every sequence (one per (batch row, KV head)) owns a list of fixed-size pages in a shared
key/value pool, described by a page table, so one launch covers sequences of any lengths and its
cost follows the *total* number of stored tokens (docs/DESIGN.md s.8), never the longest head.
One program handles one sequence and all ``G`` query heads of its group (times the new tokens):
the KV pages are read once per group, ``BLOCK_TOKENS`` tokens (several small pages) per
iteration, scores and the online softmax in fp32. When there are
too few sequences to fill the GPU, the pages of a sequence are split over several programs
(flash-decoding) and a second small kernel merges the partial softmax states.

The PyTorch reference is :func:`heterocache.attention.reference.ragged_attention_reference`.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton: SDPA buckets are the fallback
    triton = None

LOG2E = 1.4426950408889634
BLOCK_TOKENS = 64  # tokens per inner iteration (several pages when they are small)


def _interpreting() -> bool:
    try:
        from triton import knobs
    except ImportError:  # triton < 3.3
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return bool(knobs.runtime.interpret)


@functools.lru_cache(maxsize=8)
def triton_available(device: str | torch.device) -> bool:
    """True when the kernel can run on ``device``: triton installed and a CUDA device.

    Under ``TRITON_INTERPRET=1`` (tests) any device is accepted, since the interpreter runs on CPU.
    """
    if triton is None:
        return False
    if _interpreting():
        return True
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        query, key_pool, value_pool, page_table, lengths, out, part_acc, part_stats,
        scale_log2, blocks_per_split,
        stride_q_seq, stride_q_row, stride_k_page, stride_k_tok, stride_v_page, stride_v_tok,
        stride_pt_seq, stride_o_seq, stride_o_row,
        ROWS: tl.constexpr, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NEW_TOKENS: tl.constexpr, SPLIT: tl.constexpr,
        PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        seq = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        length = tl.load(lengths + seq).to(tl.int32)
        rows = tl.arange(0, BLOCK_ROWS)
        dims = tl.arange(0, BLOCK_D)
        toks = tl.arange(0, BLOCK_N)  # BLOCK_N // PAGE pages per iteration
        row_ok = rows < ROWS
        dim_ok = dims < HEAD_DIM
        q = tl.load(query + seq * stride_q_seq + rows[:, None] * stride_q_row + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        # row g*NEW_TOKENS + t is new token t of query head g: it sees keys < length - NEW_TOKENS + t + 1
        limit = length - NEW_TOKENS + 1 + rows % NEW_TOKENS
        m_i = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_ROWS], tl.float32)
        acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
        n_pages = tl.cdiv(length, PAGE)
        first = split * blocks_per_split
        last = tl.minimum(first + blocks_per_split, tl.cdiv(length, BLOCK_N))
        for block in range(first, last):
            pos = block * BLOCK_N + toks
            slot = pos // PAGE  # page-table column of each token
            page = tl.load(page_table + seq * stride_pt_seq + slot, mask=slot < n_pages, other=0).to(tl.int64)
            in_page = (toks % PAGE)[:, None]
            kv_mask = (pos < length)[:, None] & dim_ok[None, :]
            k = tl.load(key_pool + page[:, None] * stride_k_page + in_page * stride_k_tok + dims[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(value_pool + page[:, None] * stride_v_page + in_page * stride_v_tok + dims[None, :],
                        mask=kv_mask, other=0.0)
            if DOT_FP32:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (BLOCK_ROWS, BLOCK_N), log2 units
            s = tl.where(pos[None, :] < limit[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
            alpha = tl.exp2(m_i - m_safe)
            prob = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(prob, 1)
            acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        if SPLIT:
            base = (seq * n_splits + split) * BLOCK_ROWS
            tl.store(part_acc + (base + rows[:, None]) * BLOCK_D + dims[None, :], acc)
            tl.store(part_stats + (base + rows) * 2, m_i)
            tl.store(part_stats + (base + rows) * 2 + 1, l_i)
        else:
            res = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # an empty sequence gives zeros
            tl.store(out + seq * stride_o_seq + rows[:, None] * stride_o_row + dims[None, :],
                     res.to(out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])

    @triton.jit
    def _merge_splits_kernel(
        out, part_acc, part_stats, n_splits, stride_o_seq, stride_o_row,
        ROWS: tl.constexpr, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        seq = tl.program_id(0)
        rows = tl.arange(0, BLOCK_ROWS)
        dims = tl.arange(0, BLOCK_D)
        m_i = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_ROWS], tl.float32)
        acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
        for split in range(0, n_splits):
            base = (seq * n_splits + split) * BLOCK_ROWS
            m_s = tl.load(part_stats + (base + rows) * 2)
            l_s = tl.load(part_stats + (base + rows) * 2 + 1)
            acc_s = tl.load(part_acc + (base + rows[:, None]) * BLOCK_D + dims[None, :])
            m_new = tl.maximum(m_i, m_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            beta = tl.exp2(m_s - m_safe)
            l_i = l_i * alpha + l_s * beta
            acc = acc * alpha[:, None] + acc_s * beta[:, None]
            m_i = m_new
        res = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out + seq * stride_o_seq + rows[:, None] * stride_o_row + dims[None, :],
                 res.to(out.dtype.element_ty), mask=(rows < ROWS)[:, None] & (dims < HEAD_DIM)[None, :])


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _auto_splits(n_seq: int, max_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (~4 per SM) without splits shorter than 4 token blocks."""
    if device.type != "cuda" or max_blocks <= 4:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if n_seq >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(4 * sms, n_seq), max_blocks // 4))


def paged_decode_attention(query: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor,
                           page_table: torch.Tensor, lengths: torch.Tensor, scaling: float,
                           new_tokens: int = 1, num_splits: int | None = None) -> torch.Tensor:
    """Decode attention over paged ragged sequences.

    ``query (n_seq, R, D)``: the rows of sequence ``s`` (its KV head's ``G`` query heads; with
    ``new_tokens = q > 1``, ``R = G * q`` and row ``g * q + t`` is new token ``t`` of head ``g``,
    causal among the new tokens, which are the last ``q`` stored). ``key_pool/value_pool
    (n_pages, page_size, D)``; ``page_table (n_seq, max_pages)`` int32 page ids (entries past a
    sequence's last page are ignored); ``lengths (n_seq,)`` stored tokens per sequence (int32 or
    int64, 0 allowed: zeros out). ``page_size`` a power of two >= 16. Returns ``(n_seq, R, D)`` in
    the query dtype; accumulation is fp32 (fp32 inputs use IEEE fp32 products, no TF32).
    """
    if triton is None:
        raise RuntimeError("paged_decode_attention needs the `triton` package (pip install triton)")
    n_seq, rows, dim = query.shape
    n_pages, page_size, pool_dim = key_pool.shape
    if value_pool.shape != key_pool.shape or pool_dim != dim:
        raise ValueError(f"key_pool {tuple(key_pool.shape)} / value_pool {tuple(value_pool.shape)} must both be "
                         f"(n_pages, page_size, {dim})")
    if page_size < 16 or page_size & (page_size - 1):
        raise ValueError(f"page_size={page_size} must be a power of two >= 16")
    if page_table.shape[0] != n_seq or lengths.shape != (n_seq,):
        raise ValueError(f"page_table {tuple(page_table.shape)} and lengths {tuple(lengths.shape)} must have "
                         f"{n_seq} rows (one per sequence)")
    if rows % new_tokens:
        raise ValueError(f"query rows {rows} must be a multiple of new_tokens={new_tokens}")
    query, key_pool, value_pool = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key_pool, value_pool))
    page_table, lengths = page_table.contiguous(), lengths.contiguous()
    out = torch.empty_like(query)
    if n_seq == 0:
        return out
    block_n = max(page_size, BLOCK_TOKENS)
    max_blocks = max(1, triton.cdiv(page_table.shape[1] * page_size, block_n))
    splits = max(1, min(num_splits or _auto_splits(n_seq, max_blocks, query.device), max_blocks))
    blocks_per_split = triton.cdiv(max_blocks, splits)
    block_rows, block_d = _pow2_at_least_16(rows), _pow2_at_least_16(dim)
    if splits > 1:
        part_acc = torch.empty((n_seq, splits, block_rows, block_d), dtype=torch.float32, device=query.device)
        part_stats = torch.empty((n_seq, splits, block_rows, 2), dtype=torch.float32, device=query.device)
    else:
        part_acc = part_stats = out  # unused
    # fp32 inputs: exact fp32 products (no TF32). 16-bit inputs use tensor-core dots on the GPU; the
    # CPU interpreter mis-multiplies bf16 dots (triton 3.9), so there they are widened to fp32 first.
    interpreted = _interpreting()
    precision = "ieee" if query.dtype == torch.float32 or interpreted else "tf32"
    _paged_decode_kernel[(n_seq, splits)](
        query, key_pool, value_pool, page_table, lengths, out, part_acc, part_stats,
        float(scaling) * LOG2E, blocks_per_split,
        query.stride(0), query.stride(1), key_pool.stride(0), key_pool.stride(1),
        value_pool.stride(0), value_pool.stride(1), page_table.stride(0), out.stride(0), out.stride(1),
        ROWS=rows, BLOCK_ROWS=block_rows, HEAD_DIM=dim, BLOCK_D=block_d, PAGE=page_size, BLOCK_N=block_n,
        NEW_TOKENS=new_tokens, SPLIT=splits > 1, PRECISION=precision, DOT_FP32=interpreted,
    )
    if splits > 1:
        _merge_splits_kernel[(n_seq,)](
            out, part_acc, part_stats, splits, out.stride(0), out.stride(1),
            ROWS=rows, BLOCK_ROWS=block_rows, HEAD_DIM=dim, BLOCK_D=block_d,
        )
    return out


def pages_from_padded(keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, page_size: int = 16):
    """Pack padded sequences into a compact page pool.

    ``keys/values (n, L, D)`` with ``lengths (n,)`` valid tokens each -> ``key_pool, value_pool
    (P, page_size, D)`` holding only the ``ceil(length / page_size)`` pages each sequence needs
    (P = their sum), and ``page_table (n, max_pages)`` int32 (0 past a sequence's pages).
    """
    n, length, dim = keys.shape
    width = -(-max(length, 1) // page_size) * page_size
    pad = (0, 0, 0, width - length)
    paged_k = torch.nn.functional.pad(keys, pad).view(n, width // page_size, page_size, dim)
    paged_v = torch.nn.functional.pad(values, pad).view(n, width // page_size, page_size, dim)
    pages_per_seq = (lengths.to(torch.long) + page_size - 1) // page_size
    used = torch.arange(width // page_size, device=keys.device)[None, :] < pages_per_seq[:, None]
    first_page = torch.cumsum(pages_per_seq, 0) - pages_per_seq
    table = torch.where(used, first_page[:, None] + torch.arange(width // page_size, device=keys.device), 0)
    max_pages = max(1, int(pages_per_seq.max())) if n else 1
    return paged_k[used], paged_v[used], table[:, :max_pages].to(torch.int32).contiguous()


def dense_as_pages(keys: torch.Tensor, values: torch.Tensor, page_size: int = 16,
                   table: torch.Tensor | None = None):
    """Zero-copy paged view of dense per-sequence storage (a cache bucket).

    ``keys/values (n, capacity, D)`` contiguous with ``capacity % page_size == 0`` -> ``key_pool,
    value_pool (n * capacity // page_size, page_size, D)`` views and ``page_table (n, capacity //
    page_size)`` int32 where sequence ``i`` owns pages ``i * capacity // page_size + j``. The table
    depends only on ``(n, capacity)``: pass the previous ``table`` to reuse it (it is rebuilt when
    its shape no longer matches, i.e. after the storage grew).
    """
    n, capacity, dim = keys.shape
    if capacity % page_size or not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError(f"dense_as_pages needs contiguous storage with capacity ({capacity}) a multiple of "
                         f"page_size ({page_size})")
    per_seq = capacity // page_size
    if table is None or tuple(table.shape) != (n, per_seq) or table.device != keys.device:
        table = torch.arange(n * per_seq, dtype=torch.int32, device=keys.device).view(n, per_seq)
    pool_shape = (n * per_seq, page_size, dim)
    return keys.view(pool_shape), values.view(pool_shape), table
