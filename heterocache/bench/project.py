"""``heterocache bench --project GPU[,GPU]``: projected GPU decode steps from the roofline of
``bench/roofline.py`` (formulas there and in docs/DESIGN.md s.8).

Every projected row is a :class:`Workload`: one method at one keep and context, described by the
bytes of one row (sequence) as shares of that row's full KV, which carry over from the measured
model to another shape: the kept fraction ``r`` (for the bound), the device KV the attention reads
(held tokens), the index / metadata read on the device, and the slow-tier bytes moved per decode
token, critical and prefetched. Two sources:

- **measured runs** (``heterocache bench ... --project h200``): each result line of the run, with the
  measured model's own weight bytes and full KV (bench/run.py ``transfer_fields``: counters over the
  timed decode steps only);
- **shapes without running** (``--model-config llama-3.1-8b --context 128k --batch 1,8`` with
  ``--moved-share-from DIR`` or ``--moved-share S``): the weights and KV of that architecture in
  ``--dtype`` (default bf16), from its config on the meta device (nothing is allocated), and each
  method's shares from the line of a bench result directory at the nearest context (``DIR``), or
  given (``--moved-share``, ``--prefetched-share``, ``--kept-fraction``; the index then costs the
  budget's remainder, ``keep - kept``, as the budget accounting pays it: docs/DESIGN.md s.2).

Every table names where its shares come from. Batches: the measured (or ``--batch``) ones, plus
the largest batch FullKV fits in the preset's HBM (``W_resident + B * KV_row <= capacity``), where
throughput is compared at the same batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from heterocache.bench.models import bandwidth_bound
from heterocache.bench.roofline import Gpu, StepBytes, full_step_time, largest_batch, step_time


@dataclass(frozen=True)
class Shares:
    """One method's bytes per row as shares of the row's full KV at the context (per decode token for the
    slow-tier bytes), and where they come from (``source``: short, ``detail``: the whole reference)."""

    kept: float  # r: kept fraction of the prompt's tokens (the bound's)
    device: float  # device KV the attention reads (held tokens)
    metadata: float = 0.0  # index / summaries read on the device
    critical: float = 0.0  # slow-tier bytes an attention waits for
    prefetched: float = 0.0  # slow-tier bytes issued at least one layer ahead
    source: str = ""
    detail: str = ""


FULL_SHARES = Shares(1.0, 1.0, source="FullKV", detail="FullKV: every token on the device, nothing moved")


@dataclass(frozen=True)
class Workload:
    """One projected method: the shape's bytes (``weights`` read per step, ``resident_weights`` held,
    ``kv_row`` = full KV of one row at ``context``) and the method's :class:`Shares`; ``batch``: the
    measured batch (measured runs), else None."""

    method: str
    keep: float
    context: int
    kv_row: float
    weights: float
    resident_weights: float
    shares: Shares
    batch: int | None = None

    def step(self, batch: int) -> StepBytes:
        kv, s = batch * self.kv_row, self.shares
        return StepBytes(self.weights, s.device * kv, s.metadata * kv, s.critical * kv, s.prefetched * kv)


def project(work: Workload, device: Gpu, batch: int) -> dict:
    """The projected step of ``work`` at ``batch`` on ``device`` against FullKV of the same shape and batch."""
    kv = batch * work.kv_row
    step = work.step(batch)
    time = step_time(step, device)
    full = full_step_time(work.weights, kv, device)
    bound = bandwidth_bound(work.weights, kv, work.shares.kept)
    speedup = full / time.total_s
    device_row = (work.shares.device + work.shares.metadata) * work.kv_row
    return {
        "gpu": device.name, "method": work.method, "keep": work.keep, "kept": work.shares.kept,
        "context": work.context, "batch": batch, "full_kv_bytes": kv, "weight_bytes": work.weights,
        "hbm_bytes": step.weights + step.device_kv + step.metadata, "critical_bytes": step.critical,
        "prefetched_bytes": step.prefetched, "hbm_ms": time.hbm_s * 1e3, "critical_ms": time.critical_s * 1e3,
        "prefetch_excess_ms": time.prefetch_excess_s * 1e3, "step_ms": time.total_s * 1e3,
        "tokens_per_s": batch / time.total_s, "full_step_ms": full * 1e3, "full_tokens_per_s": batch / full,
        "speedup_vs_full": speedup, "bound_speedup": bound, "of_bound": speedup / bound,
        "fits": work.resident_weights + batch * device_row <= device.capacity_bytes,
        "full_fits": work.resident_weights + kv <= device.capacity_bytes,
        "largest_full_batch": largest_batch(work.resident_weights, work.kv_row, device.capacity_bytes),
        "source": work.shares.source, "source_detail": work.shares.detail,
    }


def project_all(workloads: list[Workload], devices: list[Gpu], batches: list[int] | None = None) -> list[dict]:
    """Rows for every device x (context, batch) x workload, FullKV first. ``batches``: the batches of the
    shape mode; None (measured runs): each workload's own batch. The largest batch FullKV fits on
    the device is added per context (``at_largest_full_batch`` marks its rows)."""
    rows = []
    for device in devices:
        for context in sorted({w.context for w in workloads}):
            here = [w for w in workloads if w.context == context]
            here.sort(key=lambda w: (w.method != "full", w.method, -w.keep))
            wanted = sorted({b for w in here for b in ([w.batch] if batches is None else batches)})
            largest = largest_batch(here[0].resident_weights, here[0].kv_row, device.capacity_bytes)
            for batch in wanted:
                rows += [project(w, device, batch) for w in here if batches is not None or w.batch == batch]
            if largest and largest not in wanted:  # one workload per method: its largest measured batch
                once = {(w.method, w.keep): w for w in sorted(here, key=lambda w: w.batch or 0)}
                rows += [{**project(w, device, largest), "at_largest_full_batch": True} for w in once.values()]
    return rows


# --- measured lines ---------------------------------------------------------------------------

def line_shares(line: dict, source: str, detail: str) -> Shares | None:
    """The shares of a bench decode line (None for a natural-limit line or one written before the bench
    counted slow-tier bytes)."""
    if line.get("kind") != "decode" or line.get("natural_limit") or "critical_share_of_kv" not in line:
        return None
    kv = line["kv_full_bytes"]
    return Shares(kept=line["cache"]["keep_fraction"], device=line["device_kv_read_bytes"] / kv,
                  metadata=line["device_metadata_bytes"] / kv, critical=line["critical_share_of_kv"],
                  prefetched=line["prefetched_share_of_kv"], source=source, detail=detail)


def _options_label(line: dict) -> str:
    options = line.get("options") or {}
    return "" if not options else " " + json.dumps(options, sort_keys=True)


def measured_workloads(lines: list[dict]) -> list[Workload]:
    """One workload per decode line of a measured run, with the run's own weights and KV."""
    out: dict[tuple, Workload] = {}  # a setting measured again (another schedule, a resumed run): the latest
    for line in lines:
        shares = line_shares(line, "this run", "this run: the line's own counters over its timed decode steps")
        if shares is None:
            continue
        batch = line["batch"]
        work = Workload(method=line["method"] + _options_label(line), keep=line["keep"], context=line["context"],
                        kv_row=line["kv_full_bytes"] / batch, weights=line["weight_bytes"],
                        resident_weights=line.get("weight_resident_bytes", line["weight_bytes"]),
                        shares=shares, batch=batch)
        out[(work.method, work.keep, work.context, batch)] = work
    return list(out.values())


# --- shapes without running -------------------------------------------------------------------

def read_share_lines(directory: str | Path) -> list[dict]:
    """The bench decode lines of ``DIR/results.jsonl`` that carry slow-tier byte counters (FullKV and
    natural-limit lines left out). ValueError naming what is missing otherwise."""
    from heterocache.eval.results import read_jsonl

    path = Path(directory).expanduser() / "results.jsonl"
    if not path.is_file():
        raise ValueError(f"--moved-share-from {directory}: no results.jsonl of `heterocache bench --out DIR` there "
                         "(eval result directories record retrieval_bytes without the critical / prefetched split "
                         "or the full KV bytes: pass --moved-share instead)")
    lines = [x for x in read_jsonl(path) if x.get("kind") == "decode" and not x.get("natural_limit")]
    counted = [x for x in lines if "critical_share_of_kv" in x and x["method"] != "full"]
    if not counted:
        raise ValueError(f"--moved-share-from {directory}: results.jsonl has no decode line of a compressed method "
                         "with slow-tier byte counters (written before the bench counted them? run the bench again)")
    return counted


def select_share_lines(lines: list[dict], methods: list[str] | None, keeps: list[float] | None,
                       directory: str) -> list[dict]:
    """The lines of the selected methods and keeps (all without a selection); every selected (method, keep)
    must have one."""
    chosen = [x for x in lines if (methods is None or x["method"] in methods) and (keeps is None or x["keep"] in keeps)]
    have = sorted({(x["method"], x["keep"]) for x in lines})
    wanted = [(m, k) for m in (methods or []) if m != "full" for k in (keeps or sorted({x["keep"] for x in lines}))]
    missing = [f"{m} keep {k:g}" for m, k in wanted if not any(x["method"] == m and x["keep"] == k for x in chosen)]
    if missing or not chosen:
        raise ValueError(f"--moved-share-from {directory}: no measured line for {', '.join(missing) or 'the selection'}; "
                         f"it has {', '.join(f'{m} keep {k:g}' for m, k in have)}")
    return chosen


def nearest_lines(lines: list[dict], context: int) -> list[dict]:
    """Per (method, keep, options): the line measured at the context nearest ``context`` (ties: the longer),
    then the smallest batch, then the latest."""
    best: dict[tuple, tuple] = {}
    for order, line in enumerate(lines):
        key = (line["method"], line["keep"], _options_label(line))
        rank = (abs(line["context"] - context), -line["context"], line["batch"], -order)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, line)
    return [line for _, line in best.values()]


@dataclass(frozen=True)
class Shape:
    """An architecture's bytes in one dtype: weights read per step, weights held, KV bytes per token per row."""

    name: str
    dtype: str
    weights: float
    resident_weights: float
    kv_per_token: float


def architecture_shape(name: str, dtype_name: str, layers: int | None = None) -> Shape:
    """The :class:`Shape` of ``--model-config name`` built on the meta device (no memory)."""
    from heterocache.bench.models import (
        architecture_config,
        kv_bytes,
        meta_model,
        torch_dtype,
        weight_read_bytes,
    )
    from heterocache.models import model_geometry

    dtype = torch_dtype(dtype_name)
    model = meta_model(architecture_config(name, layers), dtype)
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    return Shape(name, str(dtype).replace("torch.", ""), weight_read_bytes(model), resident,
                 kv_bytes(model_geometry(model), 1, 1, dtype))


def shape_workloads(shape: Shape, contexts: list[int], picks: list[tuple[str, float, Shares]]) -> list[Workload]:
    """FullKV and every ``(method, keep, shares)`` at every context on ``shape``."""
    out = []
    for context in contexts:
        for method, keep, shares in [("full", 1.0, FULL_SHARES), *picks]:
            out.append(Workload(method, keep, context, shape.kv_per_token * context, shape.weights,
                                shape.resident_weights, shares))
    return out


def shares_from_lines(lines: list[dict], context: int, directory: str) -> list[tuple[str, float, Shares]]:
    """``(method label, keep, shares)`` from the lines nearest ``context`` of a bench result directory."""
    out = []
    for line in nearest_lines(lines, context):
        detail = (f"measured in {directory} at {line['context']} tokens, batch {line['batch']} "
                  f"({line['model']}, {line['dtype']}, "
                  f"{line['device']}), {line['decode_slow_tier_bytes']['steps']} timed steps")
        shares = line_shares(line, f"DIR @{line['context']}", detail)
        out.append((line["method"] + _options_label(line), line["keep"], shares))
    return sorted(out, key=lambda x: (x[0], -x[1]))


def explicit_shares(keep: float, moved: float, prefetched: float, kept: float | None) -> Shares:
    """Shares given on the command line: the device holds ``kept`` of the tokens (default ``keep``) and
    the index the rest of the budget (``keep - kept``)."""
    kept = keep if kept is None else kept
    detail = (f"given, --moved-share {moved:g}, --prefetched-share {prefetched:g}, --kept-fraction {kept:g} "
              f"(index = keep - kept = {max(0.0, keep - kept):.3g} of the KV)")
    return Shares(kept=kept, device=kept, metadata=max(0.0, keep - kept), critical=moved, prefetched=prefetched,
                  source="given", detail=detail)


# --- tables -----------------------------------------------------------------------------------

def _num(value: float) -> str:
    """Three significant digits below 100 (0.00412, 6.71, 58.4), whole numbers above."""
    return f"{value:.0f}" if abs(value) >= 100 else "0" if value == 0 else f"{value:#.3g}"


def _gb(value: float) -> str:
    return _num(value / 1e9)


def _mb(value: float) -> str:
    return _num(value / 1e6)


def markdown(rows: list[dict], devices: list[Gpu], heading: str = "") -> str:
    """One table per GPU preset; a note with the formulas and every share source."""
    head = ("| method | keep | kept | context | batch | HBM read GB | critical MB | prefetched MB | HBM ms "
            "| critical wait ms | prefetch excess ms | step ms | tokens/s | FullKV ms | speedup vs full | bound "
            "| of bound | fits in HBM | shares from |")
    out = [heading] if heading else []
    for device in devices:
        mine = [r for r in rows if r["gpu"] == device.name]
        if not mine:
            continue
        out += ["", f"Projected decode step on {device.describe()}", "", head, "|" + "---|" * (head.count("|") - 1)]
        for r in mine:
            batch = f"{r['batch']} (FullKV's largest)" if r.get("at_largest_full_batch") else str(r["batch"])
            fits = "yes" if r["fits"] else "no"
            if not r["full_fits"] and r["method"] != "full":
                fits += " (FullKV: no)"
            cells = [r["method"], f"{r['keep']:g}", f"{r['kept']:.3f}", r["context"], batch, _gb(r["hbm_bytes"]),
                     _mb(r["critical_bytes"]), _mb(r["prefetched_bytes"]), _num(r["hbm_ms"]),
                     _num(r["critical_ms"]), _num(r["prefetch_excess_ms"]), _num(r["step_ms"]),
                     _num(r["tokens_per_s"]), _num(r["full_step_ms"]), f"{r['speedup_vs_full']:.2f}x",
                     f"{r['bound_speedup']:.2f}x", f"{r['of_bound']:.0%}", fits, r["source"]]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
    sources = sorted({(r["method"], -r["keep"], r["source_detail"]) for r in rows if r["method"] != "full"})
    weights = sorted({r["weight_bytes"] for r in rows})
    out += ["", "step = (W + D + M) / HBM + C / link + max(0, P / link - (W + D + M) / HBM): W = weights read per step "
            f"({', '.join(_gb(w) for w in weights)} GB), D = device KV read (held tokens), M = index / metadata, "
            "C = critical slow-tier bytes, P = prefetched; FullKV = (W + KV) / HBM; bound = (W + KV) / (W + r*KV), "
            "r = kept; of bound = speedup / bound; tokens/s = batch / step; fits: weights + batch x device bytes "
            "per row <= HBM capacity (activations left out). GB / MB = 1e9 / 1e6 bytes, per step (all rows). "
            "Memory-bound model: compute, launches and the decode tokens' KV are left out (bench/roofline.py)."]
    out += [f"Shares of {method} keep {-keep:g}: {detail}." for method, keep, detail in sources]
    return "\n".join(out) + "\n"


# --- the standalone mode ------------------------------------------------------------------------

@dataclass
class Plan:
    """A checked standalone projection (bench/cli.py builds it before anything loads)."""

    devices: list[Gpu]
    shape: str
    layers: int | None
    dtype: str
    contexts: list[int]
    batches: list[int]
    picks: list[tuple[str, float, Shares]] | None = None  # given shares
    lines: list[dict] | None = None  # --moved-share-from lines
    directory: str | None = None


def run_projection(plan: Plan, out_dir: str | None = None) -> int:
    """Project ``plan`` without running a model; print the tables (and write ``projection.json`` /
    ``projection.md`` under ``out_dir``)."""
    shape = architecture_shape(plan.shape, plan.dtype, plan.layers)
    workloads = []
    for context in plan.contexts:
        picks = plan.picks if plan.lines is None else shares_from_lines(plan.lines, context, plan.directory)
        workloads += shape_workloads(shape, [context], picks)
    rows = project_all(workloads, plan.devices, plan.batches)
    layers = f", {plan.layers} layers" if plan.layers else ""
    heading = (f"bench: projection without running: {shape.name}{layers} in {shape.dtype}: weights read "
               f"{_gb(shape.weights)} GB per step ({_gb(shape.resident_weights)} GB held), KV "
               f"{shape.kv_per_token / 1e3:.1f} KB per token per row")
    text = markdown(rows, plan.devices, heading)
    print(text)
    if out_dir:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "projection.json").write_text(json.dumps({"shape": shape.__dict__, "rows": rows}, indent=1))
        (path / "projection.md").write_text(text)
        print(f"bench: wrote {path}/projection.json, projection.md")
    return 0
