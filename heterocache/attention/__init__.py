"""Decode attention kernels over ragged per-head storage, behind one entry point.

:func:`decode_attention` takes a layer's buckets (``ragged.Bucket``) and a backend: ``"sdpa"``
(one batched SDPA per bucket, CPU and GPU) or ``"triton"`` (paged kernel, ``triton.py``). The loop
oracle every fast path is tested against is ``reference.ragged_attention_reference``.
"""

from heterocache.attention.ragged import Bucket, decode_attention, plan_buckets

BACKENDS = ("auto", "sdpa", "triton")

__all__ = ["BACKENDS", "Bucket", "decode_attention", "plan_buckets"]
