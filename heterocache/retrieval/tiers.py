"""Where the full copies of compressed heads live, by the method option ``offload``.

A tier stores, per layer, the full prefill keys/values of some sequences, ``(n, T, D)``, and
serves gathers ``rows x positions`` from them.

- ``offload="host"`` (tier name ``host``): CPU memory; when the model is on CUDA every gather
  writes into a freshly pinned buffer, so the copy to the device can run asynchronously.
- ``offload="disk"`` (``disk``): one safetensors file per layer in a directory, gathered through a
  read-only memory map of the file's data (only the touched pages are read).
- ``offload="none"`` (``device``): the copy stays beside the cache on the model's device: no memory
  saving, an accuracy-only emulation whose bytes ``stats()`` counts as device bytes.
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


def check_directory(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and check that it is writable; ``ValueError`` naming ``offload_dir``."""
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"offload_dir={str(directory)!r} is not a writable directory: {err}") from None
    return path


class Tier:
    """Base: ``put(layer, keys, values)``, ``gather(layer, rows, positions)``, ``nbytes()``, ``close()``."""

    name = "base"

    def __init__(self):
        self.layers: dict[int, tuple] = {}

    def nbytes(self) -> int:
        return sum(self._layer_bytes(v) for v in self.layers.values())

    def shares_memory_with(self, device: torch.device) -> bool:  # noqa: ARG002 - overridden by MemoryTier
        return False

    def _layer_bytes(self, entry) -> int:
        keys, values = entry[:2]
        return keys.nbytes + values.nbytes

    def close(self) -> None:
        self.layers.clear()


class MemoryTier(Tier):
    """Host memory (``device="cpu"``) or the model's device (the ``offload="none"`` emulation)."""

    def __init__(self, device: torch.device, pin: bool = False, name: str = "host"):
        super().__init__()
        self.device, self.pin, self.name = torch.device(device), pin, name

    def put(self, layer: int, keys: torch.Tensor | None, values: torch.Tensor) -> None:
        """``keys/values (n, T, D)``; copied (the caller's tensors are freed after prefill). ``keys=None``:
        values only (a policy that rebuilds keys on the device; the keys are stored as ``(n, T, 0)``)."""
        keys = values.new_empty((*values.shape[:2], 0)) if keys is None else keys
        self.layers[layer] = (self._copy(keys), self._copy(values))

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy on this tier; pinned when ``pin`` (a GPU kernel then reads it over the link directly)."""
        tensor = tensor.detach()
        if not (self.pin and self.device.type == "cpu"):
            return tensor.to(self.device, copy=True)
        out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        out.copy_(tensor)
        return out

    def select_rows(self, layer: int, rows: torch.Tensor) -> None:
        """Keep stored rows ``rows (n',)`` of ``layer`` in that order (beam search's reorder)."""
        keys, values = self.layers[layer]
        rows = rows.to(keys.device)
        if rows.numel() == keys.shape[0] and torch.equal(rows, torch.arange(keys.shape[0], device=keys.device)):
            return
        self.layers[layer] = (self._copy(keys.index_select(0, rows)), self._copy(values.index_select(0, rows)))

    def shares_memory_with(self, device: torch.device) -> bool:
        """The stored copies live where the cache does (host tier of a CPU model, ``offload="none"``):
        reading them costs a local copy, no transfer."""
        return self.device == torch.device(device) and not self.pin

    def blocks(self, layer: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys, values of ``layer`` viewed as ``(n * T / group, group * D)`` blocks (no copy)."""
        keys, values = self.layers[layer]
        n, length, dim = values.shape  # (keys may be (n, T, 0): values only)
        return (keys.view(n * length // group, group * keys.shape[-1]),
                values.view(n * length // group, group * dim))

    def take(self, layer: int, flat: torch.Tensor, keys_out: torch.Tensor, values_out: torch.Tensor,
             group: int = 1) -> None:
        """Copy blocks of ``group`` consecutive entries of ``layer``, numbered ``row * T / group + block``
        by ``flat (m,)``, into ``keys_out/values_out (m, group * D)`` (contiguous, same device and
        dtype as the tier; ``T`` a multiple of ``group``)."""
        keys, values = self.blocks(layer, group)
        if keys_out is not None:
            torch.index_select(keys, 0, flat, out=keys_out)
        torch.index_select(values, 0, flat, out=values_out)

    def gather(self, layer: int, rows: torch.Tensor, positions: torch.Tensor):
        """``rows (m,)`` into the stored ``n``, ``positions (m, k)`` -> keys, values ``(m, k, D)`` on this
        tier, written into pinned memory when ``pin`` (the transfer to the GPU is then asynchronous)."""
        keys, values = self.layers[layer]
        n, length, _ = values.shape
        flat = (rows.to(values.device)[:, None] * length + positions.to(values.device)).reshape(-1)
        out = []
        for stored in (keys, values):  # keys (n, T, 0) when the tier holds values only
            dim = stored.shape[-1]
            buffer = torch.empty((flat.numel(), dim), dtype=stored.dtype, device=stored.device,
                                 pin_memory=self.pin and stored.device.type == "cpu")
            if dim:
                torch.index_select(stored.view(n * length, dim), 0, flat, out=buffer)
            out.append(buffer.view(*positions.shape, dim))
        return out[0], out[1]


class DiskTier(Tier):
    """One safetensors file per layer under ``directory`` (a fresh temp dir by default)."""

    name = "disk"

    def __init__(self, directory: str | os.PathLike | None = None):
        super().__init__()
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="heterocache-"))
            self.owned = True
        else:
            self.directory = check_directory(directory)
            self.owned = False
        self.versions: dict[int, int] = {}  # rewrites of a layer's file (select_rows)

    def put(self, layer: int, keys: torch.Tensor | None, values: torch.Tensor) -> None:
        keys = values.new_empty((*values.shape[:2], 0)) if keys is None else keys  # values only
        if keys.dtype not in _NUMPY:
            keys, values = keys.float(), values.float()  # bf16 has no numpy dtype: widen on disk
        version = self.versions.get(layer, 0)
        path = self.directory / (f"layer{layer:03d}.safetensors" if not version else f"layer{layer:03d}-{version}.safetensors")
        save_file({"keys": keys.detach().cpu().contiguous(), "values": values.detach().cpu().contiguous()}, str(path))
        self.layers[layer] = self._map(path) + (path,)

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

    def select_rows(self, layer: int, rows: torch.Tensor) -> None:
        """Keep stored rows ``rows (n',)`` of ``layer`` in that order: rewritten into a new file (the old
        one stays mapped until it is replaced, then is removed)."""
        keys, values, path = self.layers[layer]
        index = rows.cpu().numpy()
        kept = [torch.from_numpy(np.ascontiguousarray(stored[index])) for stored in (keys, values)]
        self.versions[layer] = self.versions.get(layer, 0) + 1
        self.put(layer, kept[0], kept[1])
        try:
            os.remove(path)
        except OSError:
            pass

    def gather(self, layer: int, rows: torch.Tensor, positions: torch.Tensor):
        keys, values, _ = self.layers[layer]
        r = rows.cpu().numpy()[:, None]
        p = positions.cpu().numpy()
        return torch.from_numpy(np.ascontiguousarray(keys[r, p])), torch.from_numpy(np.ascontiguousarray(values[r, p]))

    def _layer_bytes(self, entry) -> int:
        return os.path.getsize(entry[2]) if os.path.exists(entry[2]) else 0

    def close(self) -> None:
        for entry in self.layers.values():
            try:
                os.remove(entry[2])
            except OSError:
                pass
        self.layers.clear()
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
