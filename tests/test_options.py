"""make_cache validates every argument at construction, with messages naming it (renovation bugs)."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, tiny_model

import heterocache as hc
from heterocache.hf import cache_kwargs
from heterocache.models import load_model
from heterocache.retrieval.tiers import make_tier


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2)


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "cake"])
def test_pooling_kernel_option_is_not_shadowed_by_the_attention_backend(model, method):
    # the attention backend used to be make_cache(kernel=...), so this option could not be set
    cache = hc.make_cache(model, method, 0.5, kernel=3, attention_backend="sdpa")
    assert cache.method.kernel == 3 and cache.attention_backend == "sdpa"
    with pytest.raises(ValueError, match="attention_backend='fast'"):
        hc.make_cache(model, method, 0.5, attention_backend="fast")


@pytest.mark.parametrize("method,options,match", [
    ("snapkv", {"window": "big"}, "window='big'.*int"),
    ("snapkv", {"window": 0}, "window=0"),
    ("snapkv", {"kernel": 4}, "kernel=4 must be odd"),
    ("snapkv", {"pooling": "median"}, "pooling='median'"),
    ("snapkv", {"gqa": "sum"}, "gqa='sum'"),
    ("pyramidkv", {"beta": 0}, "beta=0"),
    ("streamingllm", {"sinks": -1}, "sinks=-1"),
    ("streamingllm", {"evict_during_decode": "yes"}, "evict_during_decode='yes'.*bool"),
    ("h2o", {"chunk": 0}, "chunk=0"),
    ("cake", {"tau1": 0.0}, "tau1=0.0"),
    ("cake", {"gamma": -1.0}, "gamma=-1.0"),
    ("heterocache", {"steps": 0}, "steps=0"),
    ("heterocache", {"steps": 2.5}, "steps=2.5.*int"),
    ("heterocache", {"retrieval": "lazy"}, "retrieval='lazy'"),
    ("heterocache", {"offload": "tape"}, "offload='tape'"),
    ("heterocache", {"drift_threshold": "high"}, "drift_threshold='high'"),
    ("heterocache", {"max_full_share": 1.5}, "max_full_share=1.5"),
    ("heterocache", {"topk": 0}, "topk=0"),
    ("heterocache", {"recent_fraction": 2.0}, "recent_fraction=2.0"),
    ("heterocache", {"offload_dir": "/tmp/x"}, "offload_dir is only used with offload='disk'"),
])
def test_bad_option_values_fail_at_construction(model, method, options, match):
    with pytest.raises(ValueError, match=match):
        hc.make_cache(model, method, 0.5, **options)


def test_unusable_offload_dir_fails_at_construction(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="offload_dir"):
        hc.make_cache(model, "heterocache", 0.5, offload="disk", offload_dir=str(blocker / "sub"))


def test_keep_that_leaves_heads_without_prompt_tokens_still_generates(model):
    # 2 layers x 2 KV heads, a 30-token prompt: keep=0.01 gives round(1.2) = 1 token for 4 heads; the other
    # three heads attend over their decode tokens only (what the budget pays for, no error)
    ids, mask = left_padded_batch([30])
    for method in hc.available_methods():
        cache = hc.make_cache(model, method, 0.01)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache, model), max_new_tokens=3,
                                 min_new_tokens=3, do_sample=False)
        assert out.shape == (1, 33)
        if method != "full":
            assert cache.stats()["kept_tokens"] <= 1
            assert torch.stack([layer.kept_prompt_tokens() for layer in cache.layers]).eq(0).sum() >= 3


def test_offload_none_is_a_device_tier_never_pinned():
    # offload="none" keeps the copy on the model's device: the fetch must not pin or copy it
    tier = make_tier("none", torch.device("cpu"))
    assert tier.name == "device" and not tier.pin
    assert make_tier("host", torch.device("cuda")).pin  # host copies bound for a GPU gather into pinned memory
    keys = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    tier.put(0, keys, -keys)
    got_k, got_v = tier.gather(0, torch.tensor([1, 0]), torch.tensor([[0, 4], [2, 3]]))
    assert torch.equal(got_k, keys[torch.tensor([[1], [0]]), torch.tensor([[0, 4], [2, 3]])])
    assert torch.equal(got_v, -got_k)


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="is not a model directory"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="could not load a causal LM"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("method", ["full", "snapkv", "heterocache"])
def test_keep_true_is_not_keep_one(model, method):
    """``bool`` is an ``int``: ``keep=True`` used to build a FullKV-sized cache silently."""
    with pytest.raises(ValueError, match="keep must be a number .* got the boolean True"):
        hc.make_cache(model, method, True)


@pytest.mark.parametrize("argument", [{"max_length": True}, {"max_new_tokens": True}, {"topk": False},
                                      {"stable_threshold": True}, {"sim_threshold": False}])
def test_profile_heads_refuses_booleans_for_numbers(model, argument):
    name = next(iter(argument))
    with pytest.raises(ValueError, match=name):
        hc.profile_heads(model, input_ids=torch.arange(8), cache_dir=False, progress=False, **argument)


def test_prompt_beyond_the_context_window_warns_once():
    """4,200 tokens into a model with 4,096 positions: one warning naming both lengths (not an error:
    users who extend RoPE go there on purpose); within the window: none."""
    import warnings

    from conftest import tiny_model

    model = tiny_model("llama", max_positions=4096)
    ids = torch.randint(3, 128, (1, 4200), generator=torch.Generator().manual_seed(0))
    cache = hc.make_cache(model, "snapkv", 0.25)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model.generate(ids, **cache_kwargs(cache, model), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    mine = [w for w in caught if "context window" in str(w.message)]
    assert len(mine) == 1 and "4200 tokens" in str(mine[0].message) and "4096" in str(mine[0].message)
    cache = hc.make_cache(model, "snapkv", 0.25)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model.generate(ids[:, :4000], **cache_kwargs(cache, model), max_new_tokens=3, do_sample=False)
    assert not [w for w in caught if "context window" in str(w.message)]


def test_memory_tier_of_values_only():
    """``put(layer, None, values)`` (ShadowKV rebuilds keys on the device): blocks, take and gather serve
    the values, with empty keys."""
    tier = make_tier("host", torch.device("cpu"))
    values = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)
    tier.put(0, None, values)
    keys_blocks, value_blocks = tier.blocks(0, 4)
    assert keys_blocks.shape == (4, 0) and torch.equal(value_blocks[3], values[1, 4:].reshape(-1))
    out = torch.empty(2, 12)
    tier.take(0, torch.tensor([3, 0]), None, out, 4)
    assert torch.equal(out[0], values[1, 4:].reshape(-1)) and torch.equal(out[1], values[0, :4].reshape(-1))
    keys, gathered = tier.gather(0, torch.tensor([1]), torch.tensor([[2, 7]]))
    assert keys.shape == (1, 2, 0) and torch.equal(gathered[0], values[1, [2, 7]])
    assert tier.nbytes() == values.nbytes


def test_dtype_auto_is_bf16_where_the_cpu_has_it(monkeypatch):
    """``--dtype auto`` (the eval and demo default): bf16 on a CPU with AMX / AVX-512 bf16, fp32 elsewhere,
    with the reason; an explicit dtype is what it names."""
    from pathlib import Path

    from heterocache import models

    for flags, want in (("fpu sse avx512f amx_bf16 amx_tile", torch.bfloat16), ("fpu avx512_bf16", torch.bfloat16),
                        ("fpu sse2 avx2", torch.float32)):
        monkeypatch.setattr(Path, "read_text", lambda self, flags=flags: f"processor : 0\nflags\t\t: {flags}\n")
        dtype, why = models.resolve_dtype("auto")
        assert dtype == want and why.startswith("auto:")
        assert ("has" in why) == (want == torch.bfloat16)
    assert models.resolve_dtype("float32") == (torch.float32, "as asked")
    assert models.resolve_dtype(None)[0] is None
