"""Models for ``heterocache bench``: architecture presets with random weights, and byte accounting.

``--model-config llama-3.1-8b|qwen2.5-7b`` builds that architecture (optionally with fewer layers)
on the meta device, so nothing is allocated until :func:`materialise` fills it with random weights
in the timing dtype. Random weights give meaningless tokens: these models are for timing only
(the compression methods still run normally on their attention scores).
"""

from __future__ import annotations

import torch

# Dimensions from the published config.json files of the two models.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama-3.1-8b": ("llama", {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }),
    "qwen2.5-7b": ("qwen2", {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    }),
}


def architecture_config(name: str, layers: int | None = None):
    """The transformers config of preset ``name``, with ``layers`` decoder layers if given."""
    from transformers import LlamaConfig, Qwen2Config

    if name not in ARCHITECTURES:
        raise ValueError(f"--model-config {name!r} is unknown; choose one of {', '.join(ARCHITECTURES)}")
    family, fields = ARCHITECTURES[name]
    fields = dict(fields)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers {layers} must be >= 1")
        fields["num_hidden_layers"] = layers
    config = (LlamaConfig if family == "llama" else Qwen2Config)(**fields)
    config.name_or_path = f"random:{name}:layers={fields['num_hidden_layers']}"
    return config


def meta_model(config, dtype: torch.dtype):
    """The architecture on the meta device: shapes and dtypes only, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def materialise(model, device: torch.device, seed: int = 0):
    """Allocate ``model``'s meta weights on ``device`` and fill them with random values (timing only)."""
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.02, generator=gen)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.zero_()
        # rotary tables are non-persistent buffers computed in __init__: rebuild them for real
        for name, module in list(model.named_modules()):
            if hasattr(module, "inv_freq") and hasattr(module, "config"):
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, attr, type(module)(config=module.config).to(device))
    model.tie_weights()
    return model


def weight_read_bytes(model) -> int:
    """Bytes of weights one decode step must read: every parameter except the input embedding table
    (only one row per token is gathered), unless it is tied to the output head (then read there)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def kv_bytes(geometry: dict, tokens: int, batch: int, dtype: torch.dtype) -> int:
    """Keys + values of ``tokens`` tokens per sequence over all layers and KV heads."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * geometry["n_layers"] * geometry["n_kv_heads"] * geometry["head_dim"] * size * tokens * batch


def bandwidth_bound(weight_bytes: float, kv_full_bytes: float, keep_fraction: float) -> float:
    """Ideal decode speedup of keeping ``keep_fraction`` of the KV when decode is memory-bound:
    ``(W + KV) / (W + r * KV)``."""
    return (weight_bytes + kv_full_bytes) / (weight_bytes + keep_fraction * kv_full_bytes)


def torch_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` -> ``torch.bfloat16`` (the names of eval/arguments.py ``DTYPES``)."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    return None if name is None else getattr(torch, aliases.get(name, name))


def load_model_for_bench(args) -> tuple:
    """``(model, tag)`` from ``--model`` or ``--model-config``/``--layers``, on ``--device``."""
    from heterocache.models import load_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model_config:
        config = architecture_config(args.model_config, args.layers)
        dtype = torch_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        return materialise(meta_model(config, dtype), device, seed=args.seed), config.name_or_path
    if args.layers is not None:
        raise ValueError("--layers only applies with --model-config")
    model, tokenizer = load_model(None if args.model == "embedded" else args.model, device=device, dtype=args.dtype)
    model.bench_tokenizer = tokenizer  # for --prompt essays (Bench.prompt)
    return model, args.model
