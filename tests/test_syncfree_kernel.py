"""The sync-free block copy's Triton kernel against its PyTorch reference, run by the Triton interpreter."""

from __future__ import annotations

import os
import sys

# as in test_triton_kernel.py: the kernels are interpreted only when TRITON_INTERPRET=1 was set before
# triton's import, so one test reruns this file in a fresh interpreter with the variable set
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules
if IN_INTERPRETER:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton); the kernel cannot be tested")

from conftest import rerun_under_triton_interpreter, slot_state, tiny_model  # noqa: E402

import heterocache as hc  # noqa: E402
from heterocache.retrieval.syncfree import fetch_blocks, fetch_blocks_reference, pair_blocks  # noqa: E402

interpreted = pytest.mark.skipif(not IN_INTERPRETER, reason="run by test_in_fresh_interpreter")


@pytest.mark.skipif(IN_INTERPRETER, reason="already running under the interpreter")
def test_in_fresh_interpreter():
    rerun_under_triton_interpreter(__file__)


def _case(n, pages, width, slots, unit, d, dtype, seed):
    resident, current, chosen = slot_state(n, pages, width, seed)
    gen = torch.Generator().manual_seed(seed)
    _, src, dst, valid = pair_blocks(resident, current, chosen)
    tier = [torch.randn(n * pages, unit * d, generator=gen).to(dtype) for _ in range(2)]
    positions = torch.randperm(n * pages * unit, generator=gen).view(n * pages, unit)
    out = [torch.randn(n * slots, unit * d, generator=gen).to(dtype) for _ in range(2)]
    out_positions = torch.randint(0, 100, (n * slots, unit), generator=gen, dtype=torch.int32)
    return tier, positions, out, out_positions, (src, dst, valid)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 10, 4, 6, 4, 16), (2, 7, 3, 3, 1, 8), (4, 9, 5, 8, 3, 40)])
@pytest.mark.parametrize("keys", [True, False])
def test_kernel_equals_reference(dtype, shape, keys):
    """Every (sequences, pages, width, slots, unit, D) case, with and without keys, bit for bit."""
    n, pages, width, slots, unit, d = shape
    tier, positions, out, out_positions, pairs = _case(n, pages, width, slots, unit, d, dtype, seed=sum(shape))
    ref = [t.clone() for t in out] + [out_positions.clone()]
    got = [t.clone() for t in out] + [out_positions.clone()]
    tk = tier[0] if keys else None
    fetch_blocks_reference(tk, tier[1], positions, ref[0] if keys else None, ref[1], ref[2], *pairs)
    fetch_blocks(tk, tier[1], positions, got[0] if keys else None, got[1], got[2], *pairs)
    assert pairs[2].any()
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


@interpreted
def test_decode_through_the_kernel_equals_the_nonzero_swap():
    """The runtime on the kernel path (``sync_free``; the interpreter makes Triton available on CPU):
    tokens, logits and bytes equal the default swap's."""
    model = tiny_model("llama", layers=2)
    ids = torch.randint(3, 128, (2, 260), generator=torch.Generator().manual_seed(3))
    runs = []
    for sync_free in (False, True):
        cache = hc.make_cache(model, "heterocache", 0.25, refill="torch", refresh_drift=0.0)
        engine = cache.method.runtime.engine
        engine.sync_free = sync_free
        out = model.generate(ids, **hc.cache_kwargs(cache, model), max_new_tokens=5, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        slots = next(iter(engine.layers.values()))
        runs.append((out.sequences, torch.stack(out.logits), cache.stats(),
                     engine.sync_free_path(cache.layers[slots_layer(engine)], slots)))
    assert runs[0][3] is None and runs[1][3] == "triton"
    assert torch.equal(runs[0][0], runs[1][0]) and torch.allclose(runs[0][1], runs[1][1], atol=1e-6)
    assert runs[0][2]["retrieval_bytes"] == runs[1][2]["retrieval_bytes"] > 0


def slots_layer(engine) -> int:
    return next(iter(engine.layers))
