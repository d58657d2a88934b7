"""Head-wise storage: a method with a known kept set, stats, memory, crop/reset, errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import left_padded_batch, tiny_model

import heterocache as hc
from heterocache.hf import cache_kwargs
from heterocache.methods.base import Method, PrefillContext, register
from heterocache.models import check_prompt_length


@register
@dataclass
class _EveryThird(Method):
    """Test method: KV head h keeps positions p with p % 3 == h % 3 (and the last token)."""

    name = "_test_every_third"
    description = "test only"

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        t = torch.arange(ctx.seq_len)
        heads = torch.arange(ctx.n_kv_heads)
        keep = (t[None, :] % 3) == (heads[:, None] % 3)
        keep[:, -1] = True
        return keep[None].expand(ctx.keys.shape[0], -1, -1) & ctx.valid[:, None, :]


def test_known_kept_set_is_stored_exactly():
    model = tiny_model("llama", kv_heads=2, layers=2)
    ids = torch.randint(3, 128, (1, 50))
    cache = hc.make_cache(model, "_test_every_third", 0.5)
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache), use_cache=True, output_hidden_states=False)
    # recompute the true keys of layer 0 with a DynamicCache to compare stored values
    from transformers import DynamicCache

    ref_cache = DynamicCache()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        model(ids, **cache_kwargs(ref_cache), use_cache=True)
    ref_keys = ref_cache.layers[0].keys
    keys, values, positions, lengths = cache.layers[0].padded()
    for h in range(2):
        expected = [p for p in range(50) if p % 3 == h % 3 or p == 49]
        n = len(expected)
        assert lengths[0, h] == n
        assert positions[0, h, :n].tolist() == expected
        torch.testing.assert_close(keys[0, h, :n], ref_keys[0, h, expected])
    kept = sum(len([p for p in range(50) if p % 3 == h % 3 or p == 49]) for h in range(2)) * 2
    stats = cache.stats()
    assert stats["kept_tokens"] == kept
    assert stats["keep_fraction"] == pytest.approx(kept / (50 * 2 * 2))
    assert out.logits.shape == (1, 50, 128)


def test_device_bytes_fall_with_keep():
    model = tiny_model("qwen2", layers=2)
    ids = torch.randint(3, 128, (1, 400))
    full = hc.make_cache(model, "full", 1.0)
    third = hc.make_cache(model, "_test_every_third", 0.5)
    with torch.no_grad():
        model(ids, **cache_kwargs(full))
        model(ids, **cache_kwargs(third))
    ratio = third.stats()["device_bytes"] / full.stats()["device_bytes"]
    assert 0.3 < ratio < 0.4  # ~1/3 of the tokens kept, plus the same small headroom


def test_left_padding_is_never_stored():
    model = tiny_model("mistral")
    ids, mask = left_padded_batch([30, 11])
    cache = hc.make_cache(model, "full")
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwargs(cache))
    _, _, positions, lengths = cache.layers[1].padded()
    assert lengths[1].tolist() == [11, 11]
    assert positions[1, 0, :11].tolist() == list(range(19, 30))
    assert cache.stats()["prompt_tokens"] == 41


def test_manual_loop_crop_and_reset():
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (1, 20))
    cache = hc.make_cache(model, "full")
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache))
        for _ in range(5):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, **cache_kwargs(cache))
        assert cache.get_seq_length() == 25
        cache.crop(22)
        assert cache.get_seq_length() == 22
        _, _, positions, lengths = cache.layers[0].padded()
        assert lengths.tolist() == [[22, 22]] and int(positions.max()) == 21
        # multi-token append after prefill (e.g. a question fed through the compressed cache)
        out = model(torch.randint(3, 128, (1, 4)), **cache_kwargs(cache))
        assert cache.get_seq_length() == 26
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.stats()["kept_tokens"] == 0


@pytest.mark.parametrize("keep", [0, 1.5, float("nan"), -0.1, "abc"])
def test_bad_keep(keep):
    model = tiny_model()
    with pytest.raises(ValueError, match="keep"):
        hc.make_cache(model, "full", keep)


def test_unknown_method_and_option():
    model = tiny_model()
    with pytest.raises(ValueError, match="method='nope'.*full"):
        hc.make_cache(model, "nope", 0.5)
    with pytest.raises(ValueError, match="unknown option"):
        hc.make_cache(model, "full", 0.5, window=3)


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hc.load_model(str(tmp_path / "nowhere"))


def test_prompt_longer_than_context():
    model = tiny_model(max_positions=64)
    with pytest.raises(ValueError, match="context window of 64"):
        check_prompt_length(model, 60, max_new_tokens=10)


def test_non_decoder_rejected():
    from transformers import T5Config, T5ForConditionalGeneration

    from heterocache.models import check_model

    model = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64))
    with pytest.raises(ValueError, match="decoder"):
        check_model(model)
