"""GGUF checkpoints: cheap checks, content hash, and a one-time dequantisation into safetensors.

transformers reads a GGUF file by dequantising every tensor (seconds to minutes), so
:func:`dequantise` does it once and writes a plain checkpoint (config.json, model.safetensors,
tokenizer files when the file carries a tokenizer) that later loads read directly. A GGUF file's
checkpoint lives in ``models/<stem>-<first 16 hex digits of the file's sha256>``
(:func:`checkpoint_dir`), so a changed file gets a new folder and the same bytes under another
path reuse the old one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from heterocache.store import models_dir
from heterocache.store.atomic import publish_dir

MAGIC = b"GGUF"
CHUNK = 1 << 22  # sha256 read size (4 MiB)
# llama.cpp names that transformers renames before its support check (modeling_gguf_pytorch_utils)
_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
            "t5encoder": "t5"}
_NOT_ARCHITECTURES = {"general", "tokenizer"}


def check_gguf(path: str | Path) -> Path:
    """``path`` as a Path if it is a file starting with the 4-byte magic ``b"GGUF"``.

    FileNotFoundError when it does not exist; ValueError naming the path when it is a directory or
    another kind of file. Reads 4 bytes only.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file; pass a .gguf file")
    with path.open("rb") as handle:
        magic = handle.read(len(MAGIC))
    if magic != MAGIC:
        raise ValueError(f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not {MAGIC!r}); pass a .gguf "
                         "file, a model directory or a hub id")
    return path


def read_architecture(path: str | Path) -> str:
    """``general.architecture`` of a GGUF file (e.g. ``"llama"``, ``"qwen2"``), read with gguf's reader.

    ValueError naming the path when the file cannot be parsed or is shorter than its tensors need
    (a truncated download or copy).
    """
    from gguf import GGUFReader

    path = check_gguf(path)
    try:
        reader = GGUFReader(path)
    except Exception as err:  # the reader raises ValueError / IndexError / struct errors on damaged bytes
        raise ValueError(f"{str(path)!r} is not a readable GGUF file (truncated or damaged?): "
                         f"{type(err).__name__}: {err}") from None
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"{str(path)!r} is truncated: its tensors need {end} bytes, the file has {size}")
    field = reader.fields.get("general.architecture")
    if field is None or not field.data:
        raise ValueError(f"{str(path)!r} has no general.architecture field; not a model GGUF file")
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def supported_architectures() -> list[str] | None:
    """GGUF architectures the installed transformers can dequantise (None if it does not say)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return None
    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_ARCHITECTURES)


def check_architecture(path: str | Path) -> str:
    """The file's architecture, or ValueError naming it and the supported ones when transformers
    cannot dequantise it."""
    architecture = read_architecture(path)
    supported = supported_architectures()
    name = _ALIASES.get(architecture, architecture.replace("-", "_"))
    if supported is not None and architecture not in supported and name not in supported:
        from importlib.metadata import version

        raise ValueError(f"{str(path)!r}: GGUF architecture {architecture!r} (general.architecture) cannot be "
                         f"dequantised by transformers {version('transformers')}; it supports "
                         f"{', '.join(supported)}")
    return architecture


def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    """Hex sha256 of the file's bytes, read in ``chunk``-byte pieces (constant memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_dir(stem: str, sha256: str) -> Path:
    """``models/<stem>-<sha256[:16]>`` under the cache root (stem made filesystem-safe)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "model"
    return models_dir() / f"{safe}-{sha256[:16]}"


def is_checkpoint(directory: Path) -> bool:
    """True when ``directory`` holds a finished checkpoint (config.json and model.safetensors)."""
    return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


def dequantise(path: str | Path, target: Path) -> bool:
    """Dequantise the GGUF file ``path`` (fp32, with transformers) into the checkpoint folder ``target``.

    Does nothing when ``target`` is already a checkpoint. Concurrent callers are safe: each writes
    into its own temp folder and publishes it with one rename; a loser discards its copy. Returns
    True when this call wrote ``target``. ValueError naming the file when transformers cannot load it.
    """
    path = Path(path)

    def write(tmp: Path) -> None:
        model, tokenizer = load_gguf(path)
        save_checkpoint(model, tokenizer, tmp)

    return publish_dir(target, write, is_checkpoint)


def load_gguf(path: Path):
    """``(model, tokenizer or None)`` read from a GGUF file by transformers, dequantised to fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        text = str(err).strip()
        raise ValueError(f"transformers could not load {str(path)!r} as a causal LM: "
                         f"{text.splitlines()[0] if text else type(err).__name__}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception:  # no or unsupported tokenizer section (many error types): load the model without one
        tokenizer = None
    return model, tokenizer


def save_checkpoint(model, tokenizer, directory: Path) -> None:
    """Write a plain (non-GGUF) HF checkpoint: config.json, model.safetensors, tokenizer files if any."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"))  # handles the tied embedding / lm_head
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
