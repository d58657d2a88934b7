"""Shared fixtures: tiny random decoders of several families, and the embedded model."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

torch.set_num_threads(1)  # tiny models: threading only adds overhead (and CI has 2 cores)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               head_dim: int = 16, vocab: int = 128, max_positions: int = 1024):
    """A few-MB random-weight decoder (eval mode, fp32, sdpa attention)."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab, hidden_size=heads * head_dim, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                        intermediate_size=2 * heads * head_dim, max_position_embeddings=max_positions,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = model_cls(config).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="session")
def embedded():
    from heterocache.models import load_model

    return load_model()


def left_padded_batch(lengths: list[int], vocab: int = 128, seed: int = 1):
    """``input_ids, attention_mask`` of rows with the given real lengths, left padded with 0."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask


WINDOW = 8  # sliding window of the hybrid tiny models: prompts in the tests are longer


def hybrid_model(family: str, seed: int = 0, layers: int = 4, heads: int = 8, kv_heads: int = 4,
                 head_dim: int = 16, vocab: int = 128, window: int = WINDOW, max_positions: int = 1024):
    """A tiny random decoder with sliding-window layers (eval mode, fp32, sdpa).

    ``"gemma3"``: Gemma-3 style alternation (sliding, full, sliding, full); ``"mistral-sliding"``:
    every layer slides (Mistral's ``sliding_window``); ``"qwen2-hybrid"``: Qwen2 with
    ``use_sliding_window`` and ``max_window_layers=2`` (the upper layers slide).
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    common = dict(vocab_size=vocab, hidden_size=heads * head_dim, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  intermediate_size=2 * heads * head_dim, max_position_embeddings=max_positions,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=window)
    torch.manual_seed(seed)
    if family == "gemma3":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        model = Gemma3ForCausalLM(Gemma3TextConfig(layer_types=types, query_pre_attn_scalar=head_dim, **common))
    elif family == "mistral-sliding":
        model = MistralForCausalLM(MistralConfig(**common))
    elif family == "qwen2-hybrid":
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, max_window_layers=layers // 2, **common))
    else:
        raise ValueError(f"unknown hybrid family {family!r}")
    model = model.eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = 0
    return model


HYBRID_FAMILIES = ("gemma3", "mistral-sliding", "qwen2-hybrid")


def two_hot_regions(n_kv_heads: int, d: int = 8, length: int = 64):
    """The constructed-drift fixture of the HeteroCache tests: keys ``(1, H, length, d)`` with two hot
    regions, A (positions 10..13, along ``u``) and B (40..43, along ``v``), random values and a
    stand-in attention module. Returns ``module, keys, values, u, v``."""
    u, v = torch.zeros(d), torch.zeros(d)
    u[0], v[1] = 1.0, 1.0
    gen = torch.Generator().manual_seed(0)
    keys = 0.01 * torch.randn((1, n_kv_heads, length, d), generator=gen)
    keys[:, :, 10:14] += 8 * u
    keys[:, :, 40:44] += 8 * v
    values = torch.randn((1, n_kv_heads, length, d), generator=gen)
    module = types.SimpleNamespace(num_key_value_groups=1, is_causal=True, training=False)
    return module, keys, values, u, v


def attend(cache, module, keys, values, query_dir) -> None:
    """Store ``keys/values (1, H, q, D)`` in layer 0 of ``cache`` and attend with ``q`` queries along
    ``query_dir`` per KV head (one query head each)."""
    from heterocache.hf import headwise_attention

    layer = cache.layers[0]
    query = (8 * query_dir).expand(1, keys.shape[1], keys.shape[2], -1).contiguous()
    pending, _ = layer.update(keys, values)
    headwise_attention(module, query, pending, pending, None, scaling=1.0)


def slot_state(n: int = 5, pages: int = 12, width: int = 4, seed: int = 0):
    """A random refill of the block layout: ``resident (n, P)`` with ``width`` pages per row, ``current
    (n, width)`` those pages in a random slot order, ``chosen (n, width)`` distinct random pages."""
    gen = torch.Generator().manual_seed(seed)
    resident = torch.zeros(n, pages, dtype=torch.bool)
    current = torch.empty(n, width, dtype=torch.long)
    chosen = torch.empty(n, width, dtype=torch.long)
    for i in range(n):
        held = torch.randperm(pages, generator=gen)[:width]
        resident[i, held] = True
        current[i] = held[torch.randperm(width, generator=gen)]
        chosen[i] = torch.randperm(pages, generator=gen)[:width]
    return resident, current, chosen


def rerun_under_triton_interpreter(path: str) -> None:
    """Run the test file ``path`` in a fresh interpreter with ``TRITON_INTERPRET=1`` (triton decides at
    import whether kernels are interpreted, and importing torch imports it) and require that it passed
    with only its own rerun test skipped."""
    import os
    import re
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", path],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert re.search(r"\d+ passed, 1 skipped in", done.stdout), done.stdout[-2000:]
