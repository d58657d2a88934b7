"""Self-contained tiny model + tokenizer for the eval tests (no download, no model cache)."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """Byte-level tokenizer without merges: one token per byte (+ <|im_start|>, <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(vocab_size: int = 258, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096,
                         bos_token_id=256, eos_token_id=257, pad_token_id=257)
    return LlamaForCausalLM(config).eval()


def save_tiny(directory: Path) -> Path:
    """Write the tiny model and tokenizer as a local HF directory (for subprocess runs)."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


# ``heterocache bench --model-config tiny`` for the tests: a few-MB Llama that runs the whole bench
# in seconds (installed into bench.models.ARCHITECTURES by a fixture; not a user-facing preset)
TINY_BENCH_ARCHITECTURE = ("llama", {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
})
