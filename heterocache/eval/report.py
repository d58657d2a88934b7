"""Summaries, Markdown tables and PNG plots from a run directory.

Reads every ``results*.jsonl`` (runner, all shards) and ``fidelity*.jsonl`` (eval/fidelity.py) in
the directory, keeps the last line per resume key, and aggregates: task score = mean x100 over
samples, next to the mean *measured* kept fraction; fidelity = KL / top-1 averaged over windows and
perplexity = exp(mean NLL over all continuation tokens).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean

from heterocache.eval.results import FIDELITY_GLOB, RESULTS_GLOB, fidelity_key, read_jsonl, task_key


def _latest(run_dir: Path, pattern: str, key) -> list[dict]:
    merged: dict[tuple, dict] = {}
    for path in sorted(run_dir.glob(pattern)):
        for line in read_jsonl(path):
            try:
                merged[key(line)] = line
            except KeyError:
                continue
    return list(merged.values())


def summarize(run_dir: str | Path) -> dict:
    """``{"tasks": [...], "fidelity": [...]}``: one row per (suite, task, method, keep, mode, model)."""
    run_dir = Path(run_dir)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for line in _latest(run_dir, RESULTS_GLOB, task_key):
        groups[(line.get("suite", ""), line["task"], line["method"], float(line["keep"]),
                line["question_mode"], line["model"])].append(line)
    tasks = []
    for (suite, task, method, keep, mode, model), lines in sorted(groups.items()):
        speeds = [x["tokens_per_s"] for x in lines if x.get("tokens_per_s")]
        prefills = [x["prefill_s"] for x in lines if x.get("prefill_s") is not None]  # sequential lines: none
        tasks.append({
            "suite": suite, "task": task, "method": method, "keep": keep, "question_mode": mode, "model": model,
            "n": len(lines), "score": round(100 * mean(x["score"] for x in lines), 2),
            "keep_measured": round(mean(x["keep_fraction"] for x in lines), 4),
            "tokens_per_s": round(mean(speeds), 2) if speeds else None,
            "prefill_s": round(mean(prefills), 3) if prefills else None,
            **_memory([x.get("cache", {}) for x in lines], [_decode_forwards(x) for x in lines]),
        })
    fid_groups: dict[tuple, list[dict]] = defaultdict(list)
    for line in _latest(run_dir, FIDELITY_GLOB, fidelity_key):
        fid_groups[(line["method"], float(line["keep"]), line["model"])].append(line)
    fidelity = []
    for (method, keep, model), lines in sorted(fid_groups.items()):
        tokens = sum(x["tokens"] for x in lines)
        fidelity.append({
            "method": method, "keep": keep, "model": model, "windows": len(lines),
            "kl": round(sum(x["kl"] * x["tokens"] for x in lines) / tokens, 5),
            "top1": round(sum(x["top1"] * x["tokens"] for x in lines) / tokens, 4),
            "ppl": round(math.exp(sum(x["nll"] * x["tokens"] for x in lines) / tokens), 3),
            "keep_measured": round(mean(x["keep_fraction"] for x in lines), 4),
            **_memory(lines, [max(x["tokens"] - 1, 0) for x in lines]),  # teacher forcing: prefill + M - 1 steps
        })
    return {"tasks": tasks, "fidelity": fidelity}


def _decode_forwards(line: dict) -> int:
    """Decode forwards of a task line: generated tokens fed back, plus the question fed token by token
    in question mode ``decode``."""
    question = line.get("prompt_tokens", 0) - line.get("context_tokens", 0) if line.get("question_mode") == "decode" else 0
    return int(line.get("decode_steps") or 0) + max(question, 0)


def _memory(stats: list[dict], forwards: list[int] | None = None) -> dict:
    """Mean device MB and slow-tier MB (host + disk) of the cache, slow-tier bytes read per decode
    forward (KB; ``retrieval_bytes`` over the decode forwards), and whether the method masks evicted
    entries (memory not freed)."""
    device = [s["device_bytes"] for s in stats if "device_bytes" in s]
    slow = [s.get("host_bytes", 0) + s.get("disk_bytes", 0) for s in stats if "device_bytes" in s]
    moved = sum(s.get("retrieval_bytes", 0) for s in stats)
    steps = sum(forwards or [])
    return {"device_mb": round(mean(device) / 2**20, 2) if device else None,
            "slow_mb": round(mean(slow) / 2**20, 2) if slow else None,
            "moved_kb_per_token": round(moved / steps / 1024, 1) if steps and device else None,
            "masked": any(bool(s.get("masked")) for s in stats)}


def label(method: str, masked: bool = False) -> str:
    """Method name for tables: peers (another library's method run in this harness) are marked."""
    if not method.startswith("kvpress:"):
        return method
    return f"{method} (peer{', masks: frees no memory' if masked else ''})"


def write_summary(run_dir: str | Path) -> Path:
    """Write ``summary.json`` atomically (shards finishing together may race; last one wins)."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    tmp = run_dir / f".summary.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(summarize(run_dir), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _score_tables(rows: list[dict]) -> list[str]:
    out: list[str] = []
    by_suite: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_suite[(row["suite"] or "tasks", row["question_mode"], row["model"])].append(row)
    for (suite, mode, model), items in by_suite.items():
        keeps = sorted({r["keep"] for r in items if r["method"] != "full"}, reverse=True) or [1.0]
        tasks = list(dict.fromkeys(r["task"] for r in items))
        methods = list(dict.fromkeys(r["method"] for r in sorted(items, key=lambda r: r["method"] != "full")))
        cell = {(r["task"], r["method"], r["keep"]): r for r in items}
        out += [f"## {suite} ({model}, question mode: {mode})", "",
                "Score x100 (mean measured kept fraction in brackets); FullKV runs once at keep 1.0. "
                "Memory and transfer per method x keep: the table after the scores.", ""]
        for task in [*tasks, "average"] if len(tasks) > 1 else tasks:
            out += [f"### {task}", "", "| method | n | " + " | ".join(f"keep {k:g}" for k in keeps) + " |",
                    "|---|---|" + "---|" * len(keeps)]
            for method in methods:
                cells, counts = [], set()
                for keep in keeps:
                    kk = 1.0 if method == "full" else keep
                    if task == "average":
                        found = [cell[(t, method, kk)] for t in tasks if (t, method, kk) in cell]
                        ok = len(found) == len(tasks)
                        score = mean(r["score"] for r in found) if ok else None
                        kept = mean(r["keep_measured"] for r in found) if ok else None
                    else:
                        row = cell.get((task, method, kk))
                        score, kept = (row["score"], row["keep_measured"]) if row else (None, None)
                        counts.add(row["n"] if row else 0)
                    cells.append(f"{_fmt(score, 2)} ({_fmt(kept, 3)})" if score is not None else "-")
                n = "/".join(str(c) for c in sorted(counts)) if counts else "-"
                masked = any(r.get("masked") for r in items if r["method"] == method)
                out.append(f"| {label(method, masked)} | {n} | " + " | ".join(cells) + " |")
            out.append("")
        out += _memory_table(items)
    return out


def _memory_table(items: list[dict]) -> list[str]:
    """Device MB, slow-tier MB and slow-tier KB read per decode token of every method x keep (means
    over the tasks' rows)."""
    out = ["| method | keep | device MB | slow-tier MB | KB moved per decode token |", "|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in items:
        groups[(row["method"], row["keep"])].append(row)
    for (method, keep), rows in groups.items():
        values = [[r[name] for r in rows if r.get(name) is not None] for name in ("device_mb", "slow_mb",
                                                                                    "moved_kb_per_token")]
        cells = [_fmt(mean(v), 1) if v else "-" for v in values]
        out.append(f"| {label(method, any(r.get('masked') for r in rows))} | {keep:g} | " + " | ".join(cells) + " |")
    return out + [""]


def _fidelity_table(rows: list[dict]) -> list[str]:
    out = ["## Fidelity (teacher-forced, vs FullKV; the whole context compressed at prefill)", "",
           "| method | keep | measured keep | KL | top-1 | ppl | device MB | slow-tier MB | KB moved per decode token "
           "| windows |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {label(r['method'], r.get('masked', False))} | {r['keep']:g} | {r['keep_measured']:.3f} | "
                   f"{r['kl']:.4f} | {r['top1']:.3f} | {r['ppl']:.2f} | {_fmt(r.get('device_mb'), 1)} | "
                   f"{_fmt(r.get('slow_mb'), 1)} | {_fmt(r.get('moved_kb_per_token'), 1)} | {r['windows']} |")
    return out + ["", "Peers are another library's methods run in this harness on the same tokens and reference.", ""]


def _plots(run_dir: Path, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def lines_plot(rows: list[dict], value: str, name: str, ylabel: str) -> None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r["keep_measured"], r[value]) for r in rows if r["method"] == method)
            if method == "full":  # one point at keep 1.0: the reference line
                ax.axhline(points[0][1], color="gray", linestyle="--", label="full")
            elif method.startswith("kvpress:"):  # peers: dashed, hollow markers
                ax.plot(*zip(*points), marker="s", linestyle="--", markerfacecolor="none", label=f"{method} (peer)")
            else:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xlabel("measured kept fraction")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        written.append(name)

    tasks = summary["tasks"]
    for suite in dict.fromkeys(r["suite"] for r in tasks):
        rows = [r for r in tasks if r["suite"] == suite]
        means: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            means[(r["method"], r["keep"])].append(r)
        avg = [{"method": m, "keep_measured": mean(x["keep_measured"] for x in v), "score": mean(x["score"] for x in v)}
               for (m, _), v in means.items()]
        lines_plot(avg, "score", f"score_vs_keep_{suite or 'tasks'}.png", f"{suite} score x100")
    if summary["fidelity"]:
        lines_plot(summary["fidelity"], "kl", "kl_vs_keep.png", "KL(FullKV || method) per token")
        written += _tradeoff_plots(run_dir, plt, summary["fidelity"], "kl", "KL(FullKV || method) per token")
    for suite in dict.fromkeys(r["suite"] for r in tasks):
        rows = [r for r in tasks if r["suite"] == suite]
        written += _tradeoff_plots(run_dir, plt, _means(rows), "score", f"{suite or 'tasks'} score x100",
                                   suffix=f"_{suite or 'tasks'}")
    written += _niah_heatmaps(run_dir, plt)
    return written


def _means(rows: list[dict]) -> list[dict]:
    """Per (method, keep): the mean over the rows (tasks) of score and memory columns."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["keep"])].append(r)
    out = []
    for (method, keep), items in groups.items():
        row = {"method": method, "keep": keep}
        for name in ("score", "keep_measured", "device_mb", "moved_kb_per_token"):
            values = [x[name] for x in items if x.get(name) is not None]
            row[name] = mean(values) if values else None
        out.append(row)
    return out


def _tradeoff_plots(run_dir: Path, plt, rows: list[dict], value: str, ylabel: str, suffix: str = "") -> list[str]:
    """Quality against device MB and against slow-tier KB moved per decode token: one point per method x
    keep, a method's points joined, peers dashed."""
    written = []
    for axis, xlabel, name in (("device_mb", "device MB of the cache", f"{value}_vs_device_mb{suffix}.png"),
                               ("moved_kb_per_token", "slow-tier KB moved per decode token",
                                f"{value}_vs_bytes_moved{suffix}.png")):
        drawn = {method: sorted((r[axis], r[value]) for r in rows if r["method"] == method
                                and r.get(value) is not None and r.get(axis) is not None)
                 for method in dict.fromkeys(r["method"] for r in rows)}
        if not any(drawn.values()):
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, points in drawn.items():
            if not points:
                continue
            peer = method.startswith("kvpress:")
            ax.plot(*zip(*points), marker="s" if peer else "o", linestyle="--" if peer else "-",
                    markerfacecolor="none" if peer else None, label=f"{method} (peer)" if peer else method)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def _niah_heatmaps(run_dir: Path, plt) -> list[str]:
    cells: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in _latest(run_dir, RESULTS_GLOB, task_key):
        extra = line.get("extra", {})
        if line["task"] == "niah" and "length" in extra and "depth" in extra:
            cells[(line["method"], float(line["keep"]))][(extra["length"], extra["depth"])].append(line["score"])
    written = []
    for (method, keep), grid in cells.items():
        lengths = sorted({k[0] for k in grid})
        depths = sorted({k[1] for k in grid})
        values = [[mean(grid[(n, d)]) if (n, d) in grid else float("nan") for n in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(lengths), 1 + 0.3 * len(depths)))
        image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context tokens")
        ax.set_ylabel("depth")
        ax.set_title(f"NIAH {method} keep {keep:g}", fontsize=9)
        fig.colorbar(image)
        fig.tight_layout()
        name = f"niah_{re.sub(r'[^A-Za-z0-9_.@-]', '_', method)}_keep{keep:g}.png"
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        written.append(name)
    if len(cells) > 1:
        written += _niah_grid(run_dir, plt, cells)
    return written


def niah_grid_values(cells: dict) -> tuple[list[str], list[float], list, list, dict]:
    """``cells[(method, keep)][(length, depth)] = [scores]`` -> ``(methods, keeps, lengths, depths, values)``
    with ``values[(method, keep)][depth_index][length_index]`` the mean score relative to FullKV's mean
    on the same (length, depth), capped at 1 (raw when FullKV did not run; NaN where nothing ran or
    FullKV scored 0)."""
    full = next((grid for (method, _), grid in cells.items() if method == "full"), None)
    methods = list(dict.fromkeys(method for method, _ in cells if method != "full"))
    keeps = sorted({keep for method, keep in cells if method != "full"}, reverse=True)
    lengths = sorted({k[0] for grid in cells.values() for k in grid})
    depths = sorted({k[1] for grid in cells.values() for k in grid})
    values = {}
    for method, keep in cells:
        if method == "full":
            continue
        grid, table = cells[(method, keep)], []
        for d in depths:
            row = []
            for n in lengths:
                score = mean(grid[(n, d)]) if (n, d) in grid else float("nan")
                if full is not None and (n, d) in grid:
                    reference = mean(full[(n, d)]) if (n, d) in full else float("nan")
                    score = min(1.0, score / reference) if reference > 0 else float("nan")
                row.append(score)
            table.append(row)
        values[(method, keep)] = table
    return methods, keeps, lengths, depths, values


def _niah_grid(run_dir: Path, plt, cells: dict) -> list[str]:
    """One figure of every method's NIAH heatmap (rows: keeps, columns: methods), each cell the score
    relative to FullKV's (:func:`niah_grid_values`)."""
    methods, keeps, lengths, depths, values = niah_grid_values(cells)
    if not methods:
        return []
    relative = any(method == "full" for method, _ in cells)
    fig, axes = plt.subplots(len(keeps), len(methods), squeeze=False, layout="constrained",
                             figsize=(1.2 + (0.32 * len(lengths) + 0.3) * len(methods),
                                      0.5 + (0.22 * len(depths) + 0.5) * len(keeps)))
    image = None
    nan_table = [[float("nan")] * len(lengths) for _ in depths]
    for r, keep in enumerate(keeps):
        for c, method in enumerate(methods):
            ax = axes[r][c]
            image = ax.imshow(values.get((method, keep), nan_table), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [f"{n / 1000:g}K" if n >= 1000 else str(n) for n in lengths], fontsize=6)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths] if c == 0 else [], fontsize=6)
            if r == 0:
                ax.set_title(method.replace("@", "\n@"), fontsize=7)
            if c == 0:
                ax.set_ylabel(f"keep {keep:g}\ndepth", fontsize=7)
    bar = fig.colorbar(image, ax=axes, shrink=0.9)
    bar.set_label("score / FullKV's" if relative else "score", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    name = "niah_grid.png"
    fig.savefig(run_dir / name, dpi=110)
    plt.close(fig)
    return [name]


def build_report(run_dir: str | Path, plots: bool = True) -> str:
    """Markdown report of ``run_dir``; writes ``report.md``, ``summary.json`` and PNG plots there."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    summary = summarize(run_dir)
    if not summary["tasks"] and not summary["fidelity"]:
        raise ValueError(f"{run_dir} holds no results ({RESULTS_GLOB} or {FIDELITY_GLOB})")
    write_summary(run_dir)
    lines = [f"# Evaluation report: {run_dir.name}", ""]
    lines += _score_tables(summary["tasks"]) if summary["tasks"] else []
    lines += _fidelity_table(summary["fidelity"]) if summary["fidelity"] else []
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in _plots(run_dir, summary)] + [""]
    text = "\n".join(lines)
    (run_dir / "report.md").write_text(text, encoding="utf-8")
    return text
