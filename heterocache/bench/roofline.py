"""A projected GPU decode step from a memory roofline (pure functions; docs/DESIGN.md s.8).

A decode step at batch ``B`` is taken to be memory-bound: it costs the time to read its bytes, from
HBM or, for what a retrieving method fetches from its slow tier, over the host link. Per step (all
``B`` rows, bytes):

- ``W``: weight bytes read per step (``bench/models.weight_read_bytes``: every parameter except an
  untied input embedding table; read once per step whatever ``B``);
- ``D``: device-resident KV bytes the attention reads (the held tokens of every row);
- ``M``: index / metadata bytes read on the device (HeteroCache's key sketch, Quest's page bounds);
- ``C``: critical-path bytes: fetched from the slow tier for an attention that waits for them;
- ``P``: prefetched bytes: issued at least one layer before the attention that uses them.

With ``BW_hbm`` the HBM bandwidth and ``BW_link`` the usable host-link bandwidth::

    t_hbm      = (W + D + M) / BW_hbm
    t_critical = C / BW_link
    t_excess   = max(0, P / BW_link - t_hbm)        # prefetches overlap the step's HBM time only
    t_step     = t_hbm + t_critical + t_excess

    t_full     = (W + KV) / BW_hbm                  # FullKV: weights + the whole KV over HBM
    speedup    = t_full / t_step
    bound      = (W + KV) / (W + r * KV)            # bench/models.bandwidth_bound, r = kept fraction
    of bound   = speedup / bound

``KV`` = the full KV bytes of the ``B`` rows at the context, ``r`` = the kept fraction of the
prompt's tokens. Critical bytes are added, not overlapped: the attention waits for them, and the
link is busy with them, so prefetches overlap only ``t_hbm``. Left out for every method alike:
compute (a decode step at small batch is far below the compute roof), kernel launch and
synchronisation overheads, the writes of fetched pages into HBM (``C / BW_hbm``, ~1% of
``t_critical``), the KV of the few decode tokens appended so far, and the index scan being skipped
for heads whose refill the drift gate skips (``M`` is read whole: an upper bound).

Capacity: FullKV at batch ``B`` fits when ``W_resident + B * KV_row <= HBM capacity``
(``W_resident``: every parameter, the embedding table included; activations, workspace and the CUDA
context are left out, so the largest batch is optimistic by a little).

Presets (:data:`GPUS`) give published HBM bandwidths and capacities (NVIDIA datasheets) and
*usable* host-link throughputs, which are assumptions, not link peaks: PCIe Gen5 x16 is 64 GB/s
per direction raw, ~55 GB/s is what pinned host-to-device copies reach; Gen4 x16 is 32 GB/s raw,
~25 GB/s usable. Units: bytes and seconds; TB/s = 1e12 B/s, GB/s and GB = 1e9.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Gpu:
    """A GPU for the roofline: bandwidths in bytes/s, capacity in bytes, ``link`` says which link."""

    name: str
    hbm_bytes_per_s: float
    link_bytes_per_s: float
    capacity_bytes: float
    link: str

    def describe(self) -> str:
        return (f"{self.name}: HBM {self.hbm_bytes_per_s / 1e12:.3g} TB/s, {self.capacity_bytes / 1e9:.4g} GB; "
                f"host link {self.link_bytes_per_s / 1e9:.3g} GB/s ({self.link})")


GPUS: dict[str, Gpu] = {
    "h100": Gpu("H100 SXM", 3.35e12, 55e9, 80e9, "PCIe Gen5 x16, usable throughput assumed"),
    "h200": Gpu("H200", 4.8e12, 55e9, 141e9, "PCIe Gen5 x16, usable throughput assumed"),
    "a100": Gpu("A100 80GB SXM", 2.039e12, 25e9, 80e9, "PCIe Gen4 x16, usable throughput assumed"),
}


def gpu(name: str, hbm_tbps: float | None = None, link_gbps: float | None = None,
        hbm_gb: float | None = None) -> Gpu:
    """Preset ``name`` (a key of :data:`GPUS`) with any of its numbers overridden (TB/s, GB/s, GB)."""
    if name not in GPUS:
        raise ValueError(f"unknown GPU preset {name!r}; choose from {', '.join(GPUS)}")
    out, changed = GPUS[name], []
    if hbm_tbps is not None:
        out = replace(out, hbm_bytes_per_s=hbm_tbps * 1e12)
        changed.append(f"HBM {hbm_tbps:g} TB/s")
    if link_gbps is not None:
        out = replace(out, link_bytes_per_s=link_gbps * 1e9, link="set by --link-gbps")
        changed.append(f"link {link_gbps:g} GB/s")
    if hbm_gb is not None:
        out = replace(out, capacity_bytes=hbm_gb * 1e9)
        changed.append(f"{hbm_gb:g} GB")
    return replace(out, name=f"{out.name} ({', '.join(changed)})") if changed else out


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step reads (all rows): see the module docstring for each term."""

    weights: float
    device_kv: float
    metadata: float = 0.0
    critical: float = 0.0
    prefetched: float = 0.0


@dataclass(frozen=True)
class StepTime:
    """The terms of ``t_step`` in seconds."""

    hbm_s: float
    critical_s: float
    prefetch_excess_s: float

    @property
    def total_s(self) -> float:
        return self.hbm_s + self.critical_s + self.prefetch_excess_s


def step_time(step: StepBytes, device: Gpu) -> StepTime:
    """``t_hbm``, ``t_critical`` and ``t_excess`` of one step (module docstring)."""
    hbm = (step.weights + step.device_kv + step.metadata) / device.hbm_bytes_per_s
    critical = step.critical / device.link_bytes_per_s
    excess = max(0.0, step.prefetched / device.link_bytes_per_s - hbm)
    return StepTime(hbm, critical, excess)


def full_step_time(weights: float, kv: float, device: Gpu) -> float:
    """FullKV's step: ``(W + KV) / BW_hbm`` seconds."""
    return (weights + kv) / device.hbm_bytes_per_s


def largest_batch(resident_weights: float, row_bytes: float, capacity: float) -> int:
    """The largest ``B`` with ``resident_weights + B * row_bytes <= capacity`` (0 when the weights alone
    do not fit)."""
    if resident_weights > capacity:
        return 0
    if row_bytes <= 0:
        raise ValueError("row_bytes must be > 0")
    batch = int((capacity - resident_weights) // row_bytes)
    while resident_weights + (batch + 1) * row_bytes <= capacity:  # float floor division can fall one short
        batch += 1
    while batch > 0 and resident_weights + batch * row_bytes > capacity:
        batch -= 1
    return batch
