"""Where the full copies of compressed heads live: ``device`` (emulation), ``host``, ``disk``.

A tier stores, per layer, the full prefill keys/values of some sequences, ``(n, T, D)``, and
serves gathers ``rows x positions`` from them. ``host`` is CPU memory (pinned when the model is on
CUDA); ``disk`` writes one safetensors file per layer into a directory and gathers through a
read-only memory map of the file's data (only the touched pages are read); ``device`` keeps the
copy beside the cache (no memory saving: an accuracy-only emulation, reported as device bytes).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

TIERS = ("host", "disk", "none")
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


class Tier:
    """Base: ``put(layer, keys, values)``, ``gather(layer, rows, positions)``, ``nbytes()``, ``clear()``."""

    name = "base"

    def __init__(self):
        self.layers: dict[int, tuple] = {}

    def nbytes(self) -> int:
        return sum(self._layer_bytes(v) for v in self.layers.values())

    def _layer_bytes(self, entry) -> int:
        keys, values = entry[:2]
        return keys.nbytes + values.nbytes

    def clear(self) -> None:
        self.layers.clear()


class MemoryTier(Tier):
    """Host memory (``device="cpu"``) or the model's device (the ``none`` emulation)."""

    def __init__(self, device: torch.device, pin: bool = False, name: str = "host"):
        super().__init__()
        self.device, self.pin, self.name = torch.device(device), pin, name

    def put(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """``keys/values (n, T, D)``; copied (the caller's tensors are freed after prefill)."""
        k = keys.detach().to(self.device, copy=True)
        v = values.detach().to(self.device, copy=True)
        if self.pin and self.device.type == "cpu":
            k, v = k.pin_memory(), v.pin_memory()
        self.layers[layer] = (k, v)

    def gather(self, layer: int, rows: torch.Tensor, positions: torch.Tensor):
        """``rows (m,)`` into the stored ``n``, ``positions (m, k)`` -> keys, values ``(m, k, D)`` on this tier."""
        keys, values = self.layers[layer]
        rows = rows.to(keys.device)
        positions = positions.to(keys.device)
        return keys[rows[:, None], positions], values[rows[:, None], positions]


class DiskTier(Tier):
    """One safetensors file per layer under ``directory`` (a fresh temp dir by default)."""

    name = "disk"

    def __init__(self, directory: str | os.PathLike | None = None):
        super().__init__()
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="heterocache-"))
            self.owned = True
        else:
            self.directory = Path(directory).expanduser()
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                probe = self.directory / ".write-test"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as err:
                raise ValueError(f"offload_dir={str(directory)!r} is not a writable directory: {err}") from None
            self.owned = False

    def put(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if keys.dtype not in _NUMPY:
            keys, values = keys.float(), values.float()  # bf16 has no numpy dtype: widen on disk
        path = self.directory / f"layer{layer:03d}.safetensors"
        save_file({"keys": keys.detach().cpu().contiguous(), "values": values.detach().cpu().contiguous()}, str(path))
        self.layers[layer] = self._map(path) + (path, keys.dtype)

    @staticmethod
    def _map(path: Path):
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
        out = []
        for name in ("keys", "values"):
            meta = header[name]
            dtype = {"F32": np.float32, "F16": np.float16}[meta["dtype"]]
            start, stop = meta["data_offsets"]
            count = (stop - start) // np.dtype(dtype).itemsize
            flat = np.memmap(path, dtype=dtype, mode="r", offset=8 + header_len + start, shape=(count,))
            out.append(flat.reshape(meta["shape"]))
        return tuple(out)

    def gather(self, layer: int, rows: torch.Tensor, positions: torch.Tensor):
        keys, values, _, dtype = self.layers[layer]
        r = rows.cpu().numpy()[:, None]
        p = positions.cpu().numpy()
        return torch.from_numpy(np.ascontiguousarray(keys[r, p])), torch.from_numpy(np.ascontiguousarray(values[r, p]))

    def _layer_bytes(self, entry) -> int:
        return os.path.getsize(entry[2]) if os.path.exists(entry[2]) else 0

    def clear(self) -> None:
        for entry in self.layers.values():
            try:
                os.remove(entry[2])
            except OSError:
                pass
        self.layers.clear()

    def close(self) -> None:
        self.clear()
        if self.owned:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __del__(self):  # best effort: temp files never outlive the cache
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def make_tier(offload: str, device: torch.device, directory: str | None = None) -> Tier:
    """``offload`` in ``("host", "disk", "none")`` -> a tier for the model on ``device``."""
    if offload == "host":
        return MemoryTier(torch.device("cpu"), pin=torch.device(device).type == "cuda", name="host")
    if offload == "disk":
        return DiskTier(directory)
    if offload == "none":
        return MemoryTier(device, name="device")
    raise ValueError(f"offload={offload!r} is invalid; choose one of {list(TIERS)}")
