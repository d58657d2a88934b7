"""``heterocache demo``: passkey retrieval over Paul Graham essays on the embedded model.

Each method answers the same prompts (the PEERS.md passkey protocol of ``eval/tasks/passkey.py``
with one key per depth: a 5-digit pass key hidden at depths 0.1 / 0.5 / 0.9 of a 3K-token haystack,
where the embedded model with FullKV answers all of them; chat template, greedy, 12 tokens, a hit
when the answer's first number is the key) through its compressed cache. By default the question is asked AFTER compression
(``question_mode="decode"``: the context is compressed without knowing the question, what a
cached-context or multi-turn user gets), so a method must keep, or fetch back, what the question
will need. The table shows the answers, hits, the measured kept fraction, device and host bytes of
the cache, bytes fetched from the slow tier per decoded token and, for methods with HeteroCache's drift
gate (``refresh_drift``), the share of refills the gate skipped (``retrieval_skipped /
retrieval_checked`` over the method's samples; "-" for methods without one). Results go to
``OUT/demo.json``, ``OUT/demo.md`` and ``OUT/demo.png``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch


def run_demo(methods: list[str], keep: float, out_dir: Path, length: int = 3000, question_mode: str = "decode",
             model_name: str | None = None, dtype: str = "float32") -> int:
    import heterocache as hc
    from heterocache.eval.grid import Feeder
    from heterocache.eval.runner import generate_one, score_prediction
    from heterocache.eval.tasks import passkey
    from heterocache.eval.tasks.base import encode_prompt

    unknown = [m for m in methods if m not in hc.available_methods() and not m.startswith("kvpress:")]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {hc.available_methods()}")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from heterocache.models import resolve_dtype

    torch_dtype, why = resolve_dtype(dtype)
    model, tok = hc.load_model(model_name, dtype=torch_dtype)
    dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"model loaded in {time.perf_counter() - start:.1f}s, dtype {dtype_name} ({why})")
    samples = list(passkey.load(tokenizer=tok, lengths=[length], samples=1))
    rows = []
    for method in methods:
        method_keep = 1.0 if method == "full" else keep
        answers, hits, kept, device, host, speeds, sample_stats, moved, steps = [], 0, [], [], [], [], [], 0, 0
        for sample in samples:
            context_ids, rest_ids = encode_prompt(tok, sample)
            cache = Feeder.open(model, method, method_keep)
            result = generate_one(model, tok, context_ids, rest_ids, cache, question_mode, sample.max_new_tokens)
            stats = cache.stats()
            cache.close()
            answer = result["prediction"].strip()
            answers.append(answer)
            hits += int(score_prediction(sample, answer) == 1.0)  # the first number is the key
            kept.append(stats["keep_fraction"])
            device.append(stats["device_bytes"])
            host.append(stats.get("host_bytes", 0) + stats.get("disk_bytes", 0))
            moved += int(stats.get("retrieval_bytes", 0))
            steps += max(1, stats["seen_tokens"] - len(context_ids))  # tokens through the decode path
            if result["tokens_per_s"]:
                speeds.append(result["tokens_per_s"])
            sample_stats.append(stats)
        rows.append({
            "method": method, "keep": method_keep, "answers": answers, "gold": [s.gold[0] for s in samples],
            "correct": hits, "total": len(samples), "keep_fraction": sum(kept) / len(kept),
            "device_mb": sum(device) / len(device) / 2**20, "host_mb": sum(host) / len(host) / 2**20,
            "fetched_kb_per_token": moved / steps / 1024,
            "decode_tokens_per_s": sum(speeds) / len(speeds) if speeds else 0.0,
            "refills_skipped": skipped_share(sample_stats),
        })
        print(f"  {method}: {hits}/{len(samples)}")
    table = format_table(rows, length, question_mode, dtype_name)
    print(table)
    (out_dir / "demo.json").write_text(json.dumps(rows, indent=2))
    (out_dir / "demo.md").write_text(table + "\n")
    plot_demo(rows, out_dir / "demo.png", keep)
    print(f"wrote {out_dir / 'demo.json'}, {out_dir / 'demo.md'} and {out_dir / 'demo.png'}")
    return 0


def format_table(rows: list[dict], length: int, question_mode: str, dtype: str = "float32") -> str:
    asked = "after compression (decode path)" if question_mode == "decode" else "inside the compressed prompt"
    lines = [f"Passkey in ~{length} essay tokens (depths 0.1 / 0.5 / 0.9), question asked {asked}, {dtype}", "",
             "| method | keep | answers (gold) | correct | kept fraction | device KV MB | host/disk MB | "
             "fetched KB/token | decode tok/s | refills skipped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        answers = ", ".join(f"{_short(a)} ({g})" for a, g in zip(r["answers"], r["gold"]))
        lines.append(f"| {r['method']} | {r['keep']:g} | {answers} | {r['correct']}/{r['total']} | "
                     f"{r['keep_fraction']:.3f} | {r['device_mb']:.1f} | {r['host_mb']:.1f} | "
                     f"{r['fetched_kb_per_token']:.1f} | {r['decode_tokens_per_s']:.1f} | {_share(r['refills_skipped'])} |")
    return "\n".join(lines)


def skipped_share(stats: list[dict]) -> float | None:
    """Share of refills the drift gate skipped over ``stats`` (one ``cache.stats()`` per sample):
    ``sum(retrieval_skipped) / sum(retrieval_checked)``; None when no sample had a gate decision."""
    checked = sum(int(s.get("retrieval_checked", 0) or 0) for s in stats)
    skipped = sum(int(s.get("retrieval_skipped", 0) or 0) for s in stats)
    return skipped / checked if checked else None


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _short(answer: str) -> str:
    """The number the model answered, else the start of its answer."""
    digits = re.findall(r"\d{3,}", answer)
    return digits[0] if digits else (answer[:24] + "..." if len(answer) > 24 else answer or "-")


def plot_demo(rows: list[dict], path: Path, keep: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(names, [r["correct"] / r["total"] for r in rows], color="tab:green")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("passkey accuracy")
    axes[1].bar(names, [r["device_mb"] for r in rows], color="tab:blue")
    axes[1].set_title("device KV cache (MB)")
    axes[2].bar(names, [r["decode_tokens_per_s"] for r in rows], color="tab:orange")
    axes[2].set_title("decode tokens/s")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"heterocache demo: embedded SmolLM2-135M, keep {keep:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    torch.set_grad_enabled(False)
    raise SystemExit(run_demo(["full", "snapkv", "heterocache"], 0.25, Path("demo_out")))
