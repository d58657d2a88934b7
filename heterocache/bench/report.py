"""``heterocache bench`` results: resume keys for the shared result log (eval/results.py), derived
columns, Markdown table, plot."""

from __future__ import annotations

import json
from pathlib import Path

from heterocache.bench.models import bandwidth_bound
from heterocache.eval.results import ResultLog

KEY_FIELDS = ("kind", "model", "device", "dtype", "threads", "method", "keep", "options", "context", "batch", "steps",
              "warmup", "schedule", "natural_limit", "length_spread", "prompt")


def result_key(line: dict) -> str:
    return json.dumps([line.get(k) for k in KEY_FIELDS], sort_keys=True)


def _upgrade(line: dict) -> dict:
    if line.get("kind") == "decode":
        line.setdefault("schedule", "sequential")  # lines written before schedules existed
    return line


def open_results(out_dir: Path | None) -> ResultLog:
    """``DIR/results.jsonl`` read back (a line cut mid-write is dropped and redone); in memory without a DIR."""
    return ResultLog(out_dir / "results.jsonl" if out_dir else None, result_key, upgrade=_upgrade)


def derive(lines: list[dict]) -> list[dict]:
    """Decode lines + ``speedup_vs_full``, ``bound_speedup``, ``fraction_of_bound`` (speedup / bound),
    ``fraction_of_gain`` ((speedup - 1) / (bound - 1)) and ``vs_natural_limit`` (this method's ms/token
    at keep r / FullKV's at r x context, the natural limit measured in the same group), pairing each
    line with the ``full`` line of the same model, device, dtype, threads, context, batch, step counts,
    schedule and length spread. A natural-limit line (``natural_limit`` = the context it stands for)
    pairs with the full line of that context; its kept fraction counts against that context."""
    def pair(line):
        return (*(line[k] for k in ("model", "device", "dtype", "batch", "steps", "warmup")),
                line.get("natural_limit") or line["context"], line.get("threads"),
                line.get("schedule", "sequential"), line.get("length_spread"))

    latest = {}  # a line measured again (resume, interleaved groups) replaces the earlier one
    for line in lines:
        if line["kind"] == "decode":
            latest[(pair(line), line["method"], line["keep"], line.get("natural_limit"),
                    json.dumps(line.get("options"), sort_keys=True))] = line
    full = {pair(x): x for x in latest.values() if x["method"] == "full" and not x.get("natural_limit")}
    natural = {(pair(x), x["keep"]): x for x in latest.values() if x.get("natural_limit")}
    rows = []
    for line in latest.values():
        row = dict(line)
        ref = full.get(pair(line))
        kept, kv = line["cache"]["keep_fraction"], line["kv_full_bytes"]
        if line.get("natural_limit"):
            kv = kv * line["natural_limit"] / line["context"]
            kept = kept * line["context"] / line["natural_limit"]
        bound = bandwidth_bound(line["weight_bytes"], kv, kept)
        speedup = ref["decode_ms"] / line["decode_ms"] if ref else None
        limit = natural.get((pair(line), line["keep"])) if line["method"] != "full" else None
        row.update(speedup_vs_full=speedup, bound_speedup=bound,
                   fraction_of_bound=speedup / bound if speedup else None,
                   fraction_of_gain=(speedup - 1) / (bound - 1) if speedup and bound > 1 + 1e-9 else None,
                   vs_natural_limit=line["decode_ms"] / limit["decode_ms"] if limit else None)
        rows.append(row)
    return rows


def megabytes(value) -> str:
    return f"{value / 2**20:.1f}"


def _label(row: dict) -> str:
    return "full (natural limit)" if row.get("natural_limit") else row["method"]


def _time_shares(row: dict) -> str:
    parts = [f"{name} {share:.1%}" for name, share in sorted(row.get("time_shares", {}).items())]
    cache = row.get("cache", {})
    if cache.get("retrieval_skipped"):  # HeteroCache's drift gate (refresh_drift)
        parts.append(f"refills skipped {cache['retrieval_skipped'] / cache['retrieval_checked']:.0%}")
    once = [f"{name} {value:.3f} s" for name, value in sorted(row.get("prefill_time_counters", {}).items())]
    if once:  # spent in the prefill (e.g. HeteroCache's one-time slot mapping), not in decode steps
        parts.append("in the prefill: " + ", ".join(once))
    return ", ".join(parts) or "-"


def _transfer_cells(row: dict) -> tuple[str, str]:
    """Slow-tier bytes per decode token over the timed steps, critical / prefetched: MB and share of
    the full KV of the context (n/a for lines written before the bench counted them)."""
    if "critical_bytes_per_token" not in row:
        return "n/a", "n/a"
    mb = f"{row['critical_bytes_per_token'] / 2**20:.2f} / {row['prefetched_bytes_per_token'] / 2**20:.2f}"
    return mb, f"{row['critical_share_of_kv']:.1%} / {row['prefetched_share_of_kv']:.1%}"


def _prefill_cell(row: dict) -> str:
    """Seconds to the first token; for a run that shared its prefill, next to the shared forward's."""
    if not row.get("shared_prefill_jobs"):
        return f"{row['prefill_s']:.2f}"
    return f"{row['prefill_s']:.2f} (shared {row['shared_prefill_s']:.2f}, {row['shared_prefill_jobs']} caches)"


def markdown_table(rows: list[dict], max_batches: list[dict] = ()) -> str:
    """One row per result; the footnote explains the bound, the natural limit and the timing protocol."""
    head = ("| method | keep | kept | context | batch | threads | schedule | prefill s | decode ms/token | tokens/s "
            "| speedup vs full | bound | of bound | ms / natural limit | read MB/token | peak MB | cache device MB "
            "| of which overhead MB | cache host MB | slow tier MB/token critical / prefetched | of full KV "
            "| timed parts (share of decode; prefill) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = sorted(rows, key=lambda r: (r["model"], r.get("threads", 0), r.get("schedule", ""),
                                        r.get("natural_limit") or r["context"], r["batch"],
                                        str(r.get("length_spread")), r["method"] != "full",
                                        bool(r.get("natural_limit")), r["method"], -r["keep"]))
    for r in order:
        speed = "n/a" if r["speedup_vs_full"] is None else f"{r['speedup_vs_full']:.2f}x"
        share = "n/a" if r["fraction_of_bound"] is None else f"{r['fraction_of_bound']:.0%}"
        natural = "-" if r.get("vs_natural_limit") is None else f"{r['vs_natural_limit']:.2f}"
        cache = r["cache"]
        batch = r["batch"] if "prompt_lengths" not in r else f"{r['batch']} ({'/'.join(map(str, r['prompt_lengths']))})"
        cells = [_label(r), f"{r['keep']:g}", f"{cache['keep_fraction']:.3f}", r["context"], batch,
                 r.get("threads"), r.get("schedule", "sequential"), _prefill_cell(r), f"{r['decode_ms']:.1f}",
                 f"{r['tokens_per_s']:.1f}", speed, f"{r['bound_speedup']:.2f}x", share, natural,
                 megabytes(r["read_bytes_per_token"]), megabytes(r["peak_memory_bytes"]),
                 megabytes(cache["device_bytes"]),
                 megabytes(cache["device_overhead_bytes"]) if "device_overhead_bytes" in cache else "n/a",
                 megabytes(cache["host_bytes"]), *_transfer_cells(r), _time_shares(r)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    if rows:
        r = rows[0]
        notes = "; ".join(sorted({x["peak_memory_note"] for x in rows}))
        text += (f"\nbound = (W + KV) / (W + r*KV): W = {megabytes(r['weight_bytes'])} MB of weights read per decode "
                 "token, KV = full KV bytes at the context, r = measured kept fraction; of bound = speedup / bound. "
                 "Natural limit (--natural-limit) = full at keep x context tokens, timed in the same group; "
                 "ms / natural limit = method at keep r, context C / full at r*C (1.00 = at the limit). "
                 "Overhead = decode headroom + bucket padding of the cache storage (stats()). "
                 "Slow tier = bytes read from the host/disk tier per decode token over the timed steps only "
                 "(warm-up and prefill left out): critical (a step's attention waits for them) / prefetched "
                 "(issued at least a layer ahead); of full KV = bytes per step / full KV bytes of the context. "
                 + ("Prefill s of runs that shared one forward (shared_prefill_jobs) = that forward less the "
                    "other runs' compress_s. " if any(x.get("shared_prefill_jobs") for x in rows) else "") +
                 f"Decode = median of {r['steps']} steps after {r['warmup']} warm-up ({r['device']}, {r['dtype']}). "
                 f"peak: {notes}.\n")
    if max_batches:
        text += "\n| method | keep | context | max batch |\n|---|---|---|---|\n"
        text += "".join(f"| {m['method']} | {m['keep']:g} | {m['context']} | {m['max_batch']} |\n" for m in max_batches)
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list] = {}
    styles: dict[str, str] = {}
    varying = [k for k in ("batch", "threads", "schedule") if len({str(x.get(k)) for x in rows}) > 1]
    for r in sorted(rows, key=lambda r: r["context"]):
        label = _label(r) if r["method"] == "full" else f"{r['method']} keep {r['keep']:g}"
        setting = ", ".join(f"{k} {r.get(k)}" for k in varying)
        if setting:  # one line per setting, never joining points measured under different settings
            label += f" ({setting})"
        styles[label] = setting
        series.setdefault(label, []).append((r["context"], r["decode_ms"]))
    dashes = {setting: ("-", "--", ":", "-.")[i % 4] for i, setting in enumerate(dict.fromkeys(styles.values()))}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, points in series.items():
        ax.plot(*zip(*points), marker="o", label=label, linestyle=dashes[styles[label]])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms / token (median)")
    ax.set_title(f"decode latency: {rows[0]['model']} on {rows[0]['device']}" if rows else "decode latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6 if len(series) > 8 else 8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(lines: list[dict], model_tag: str, out_dir: Path | None, devices: list = ()) -> None:
    """Print the table (and, with ``devices``, the projected GPU steps of every line: bench/project.py);
    write them with the rows under ``out_dir``."""
    rows = [r for r in derive(lines) if r["model"] == model_tag]
    max_batches = [x for x in lines if x["kind"] == "max_batch" and x["model"] == model_tag]
    table = markdown_table(rows, max_batches)
    summary = {"rows": rows, "max_batch": max_batches}
    if devices:
        from heterocache.bench.project import markdown, measured_workloads, project_all

        workloads = measured_workloads(rows)
        projected = project_all(workloads, list(devices))
        if not workloads:
            table += "\nbench: no line to project (lines written before the bench counted slow-tier bytes)\n"
        else:
            table += "\n" + markdown(projected, list(devices), f"Projection of the measured lines ({model_tag}'s own "
                                                                "weights and KV, counters of the timed steps):")
        summary["projection"] = projected
    print(table)
    if out_dir:
        (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
        (out_dir / "table.md").write_text(table)
        if rows:
            plot(rows, out_dir / "decode_ms.png")
        print(f"bench: wrote {out_dir}/results.jsonl, results.json, table.md, decode_ms.png")
