"""The cache's decode path through the Triton paged kernel (interpreted on CPU) equals SDPA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

SCRIPT = r"""
import sys, torch
sys.path.insert(0, "tests")
torch.set_num_threads(1)
import heterocache as hc
from heterocache.hf import cache_kwargs
from conftest import tiny_model, left_padded_batch
model = tiny_model("llama", layers=2, heads=6, kv_heads=2)
ids, mask = left_padded_batch([70, 33], seed=2)
outs = {}
for kernel in ("sdpa", "triton"):
    cache = hc.make_cache(model, "snapkv", 0.5, attention_backend=kernel, window=8)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=6,
                             min_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    outs[kernel] = out
assert torch.equal(outs["sdpa"].sequences, outs["triton"].sequences)
for a, b in zip(outs["sdpa"].scores, outs["triton"].scores):
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
print("DISPATCH-OK")
"""


def test_triton_kernel_dispatch_matches_sdpa():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert "DISPATCH-OK" in done.stdout, done.stderr[-3000:]
