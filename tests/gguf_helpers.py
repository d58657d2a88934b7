"""Write a Hugging Face Llama as a GGUF file (F32 tensors, llama.cpp names) with the ``gguf`` package.

llama.cpp's converter permutes the rows of q/k projections (rotary pairs interleaved per head) and
transformers reverses that on load, so :func:`write_llama_gguf` writes them permuted. The tokenizer
section (optional) is a tiny byte-level BPE ("gpt2" model): the letters, digits, "Ġ" (space) and
two merges, padded with unused tokens up to the vocabulary size.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

LAYER_TENSORS = {  # GGUF name in block N -> HF name in model.layers.N
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def rotary_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, the halves [0, d/2) and [d/2, d) interleaved pairwise."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tokenizer_tokens(vocab: int) -> tuple[list[str], list[str]]:
    """``(tokens, merges)`` of the tiny BPE: ids 0-2 are <pad>, <s>, </s>."""
    tokens = ["<pad>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", *"0123456789", "th", "the"]
    if len(tokens) > vocab:
        raise ValueError(f"vocab {vocab} < the tokenizer's {len(tokens)} tokens")
    return tokens + [f"<unused{i}>" for i in range(vocab - len(tokens))], ["t h", "th e"]


def write_llama_gguf(model, path: Path, tokenizer: bool = True, architecture: str = "llama") -> Path:
    """Write ``model`` (a ``LlamaForCausalLM``, untied lm_head) to ``path`` as GGUF; returns ``path``."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    rope = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    weights = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(Path(path).stem)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if tokenizer:
        tokens, merges = tokenizer_tokens(config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3 = control, 1 = normal
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(0)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        for short, long in LAYER_TENSORS.items():
            tensor = weights[f"model.layers.{layer}.{long}.weight"]
            if short in ("attn_q", "attn_k"):
                tensor = rotary_permute(tensor, heads if short == "attn_q" else kv_heads)
            writer.add_tensor(f"blk.{layer}.{short}.weight", tensor)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
