"""Teacher-forced fidelity of a compressed cache against FullKV (the PEERS.md protocol by default).

The essays are read in file-name order, joined with ``"\n\n"`` and tokenised whole; ``windows``
offsets are drawn in a row with ``random.Random(seed).randrange(0, n_tokens - context - continuation)``. Per window the ``context``
tokens are prefilled (and compressed), then the true continuation is fed one token per forward, so
``continuation`` next-token distributions are scored: the prefill's last one and one per fed token
(the last continuation token itself is never fed). Against the FullKV distributions ``p`` (a plain
``DynamicCache``, computed once per window) a method's ``q`` gives

- ``kl``: ``sum_v p log(p / q)`` averaged over the scored positions,
- ``top1``: fraction of positions where ``argmax q == argmax p``,
- ``nll`` / ``ppl``: the true continuation's mean negative log-likelihood and its ``exp``.

One line per window x method x keep in ``fidelity.jsonl`` (the result log of eval/results.py; reruns
skip what is there), following the comparison grid of eval/grid.py.

Shared prefill (``shared_prefill=True``, the default): per window the FullKV reference and every
pending job of our own methods are prefilled by one forward (eval/grid.py ``open_jobs``), then each
teacher-forces the continuation through its own cache; the numbers are those of separate prefills.
A line's ``seconds`` is then the job's own prefill (the shared forward less the other caches'
``compress_s``) plus its continuation, next to ``compress_s``, ``shared_prefill_s`` and
``shared_prefill_jobs``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from heterocache.eval.grid import Feeder, method_grid, open_jobs, pending
from heterocache.eval.results import ResultLog, fidelity_key
from heterocache.eval.tasks.essays import PEERS_SEPARATOR, essay_text

PROTOCOL = 2  # 1: essays joined without separator, offsets by randint (logs before 2026-11-29)


@dataclass
class FidelityConfig:
    out_dir: Path
    methods: list[str]
    keeps: list[float]
    model_id: str = "model"
    context: int = 3000
    continuation: int = 64
    windows: int = 3
    seed: int = 1234
    text_dir: str | None = None
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = True
    shared_prefill: bool = True  # one prefill forward per window for the reference and our methods

    def settings_key(self) -> str:
        blob = json.dumps({"options": self.method_options, "N": self.context, "M": self.continuation,
                           "seed": self.seed, "text_dir": self.text_dir,
                           "protocol": PROTOCOL}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def kl_per_token(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per position, summed over the vocabulary. Both ``(T, V)``; returns ``(T,)``."""
    log_p = torch.log_softmax(reference_logits.double(), dim=-1)
    log_q = torch.log_softmax(logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of positions whose argmax agrees. ``(T, V)`` each."""
    return (reference_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()


def nll_per_token(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of ``targets (T,)`` under ``logits (T, V)``; returns ``(T,)``."""
    log_q = torch.log_softmax(logits.double(), dim=-1)
    return -log_q.gather(-1, targets.view(-1, 1)).squeeze(-1)


def window_offsets(n_tokens: int, context: int, continuation: int, windows: int, seed: int) -> list[int]:
    """Start offsets of the windows, from ``random.Random(seed)``."""
    span = n_tokens - context - continuation
    if span < 0:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than context + continuation = "
                         f"{context + continuation}")
    if span == 0:
        return [0] * windows
    rng = random.Random(seed)
    return [rng.randrange(0, span) for _ in range(windows)]


@torch.inference_mode()
def peers_windows(tokenizer, context: int, continuation: int, windows: int = 3, seed: int = 1234,
                  text_dir=None) -> list[tuple[int, list[int], list[int]]]:
    """The PEERS fidelity windows of the essays (joined with ``PEERS_SEPARATOR``): one ``(offset, context
    ids, continuation ids)`` per window, offsets from :func:`window_offsets`."""
    ids = tokenizer(essay_text(text_dir, PEERS_SEPARATOR), add_special_tokens=False, verbose=False)["input_ids"]
    return [(offset, ids[offset: offset + context], ids[offset + context: offset + context + continuation])
            for offset in window_offsets(len(ids), context, continuation, windows, seed)]


def teacher_forced_logits(model, context_ids: list[int], continuation_ids: list[int], feeder: Feeder,
                          first: torch.Tensor | None = None) -> torch.Tensor:
    """``(M, V)`` float32 logits predicting each continuation token; prefill, then one token per forward.

    ``first (V,)``: the prefill's last logits when a shared prefill already filled ``feeder``'s cache."""
    device = model.device

    def forward(ids: list[int]) -> torch.Tensor:
        return feeder(torch.tensor([ids], device=device), logits_to_keep=1)[0, -1].float().cpu()

    rows = [forward(context_ids) if first is None else first.float().cpu()]
    rows += [forward([token]) for token in continuation_ids[:-1]]
    return torch.stack(rows)


def score_window(reference: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    nll = nll_per_token(logits, targets).mean().item()
    return {"tokens": int(targets.numel()), "kl": kl_per_token(reference, logits).mean().item(),
            "top1": top1_agreement(reference, logits), "nll": nll, "ppl": math.exp(nll)}


def run_fidelity(model, tokenizer, config: FidelityConfig) -> Path:
    """Evaluate every window x (method, keep) not yet in ``config.out_dir/fidelity.jsonl``.

    ``summary.json`` is the caller's to write (``eval.report.write_summary``, as the CLI does).
    """
    from tqdm.auto import tqdm

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fidelity.jsonl"
    windows = peers_windows(tokenizer, config.context, config.continuation, config.windows, config.seed,
                            config.text_dir)
    settings = config.settings_key()
    grid = method_grid(config.methods, config.keeps)
    with ResultLog(path, fidelity_key) as log:
        todo = pending(enumerate(windows), grid,
                       lambda w, m, k: (w[0], m, float(k), config.model_id, settings) in log)
        total = len(windows) * len(grid)
        bar = tqdm(total=total, initial=total - sum(len(runs) for _, runs in todo), desc="fidelity",
                   disable=not config.progress, unit="run", dynamic_ncols=True)
        for (window, (offset, context, continuation)), runs in todo:
            targets = torch.tensor(continuation)
            jobs = open_jobs(model, runs, config.method_options, torch.tensor([context], device=model.device),
                             config.shared_prefill, reference=True, logits_to_keep=1)
            reference = None
            for job in jobs:
                first = None if job.logits is None else job.logits[0, -1]
                start = time.perf_counter()
                logits = teacher_forced_logits(model, context, continuation, job.feeder, first)
                seconds = time.perf_counter() - start + (job.timing["prefill_s"] if job.timing else 0.0)
                if reference is None:  # the first job is the FullKV reference
                    reference = logits
                    continue
                stats = job.feeder.stats()
                job.feeder.close()
                timing = {k: v for k, v in (job.timing or {}).items() if k != "prefill_s"}
                log.append({"window": window, "offset": offset, "method": job.method, "keep": job.keep,
                            "model": config.model_id, "settings": settings, "context_tokens": len(context),
                            **score_window(reference, logits, targets),
                            "keep_fraction": stats.get("keep_fraction", 1.0), "seconds": round(seconds, 3),
                            **({"compress_s": round(stats["compress_s"], 4)} if "compress_s" in stats else {}),
                            **timing,
                            **{k: stats[k] for k in ("stored_fraction", "masked", "device_bytes", "host_bytes",
                                                     "disk_bytes", "retrieval_bytes") if k in stats}})
                bar.update(1)
        bar.close()
    return path
