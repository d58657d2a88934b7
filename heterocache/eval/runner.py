"""Resumable evaluation runner: samples x methods x keep fractions -> one JSONL line each.

Results go through the shared result log (eval/results.py: fsync'ed lines, a line cut mid-write is
dropped and redone, a rerun skips every key already present in the run directory); the jobs follow
the shared comparison grid (eval/grid.py: FullKV once, then every method x keep, same prompts). ``shard=(i, n)`` (or ``RANK``/``WORLD_SIZE`` under ``accelerate launch``)
takes samples ``i, i+n, ...`` and writes ``results.shard{i}of{n}.jsonl``.

Question modes (docs/DESIGN.md s.7): ``prefill`` prefills and compresses the whole prompt;
``decode`` prefills and compresses the context only, then feeds the question, answer prefix and
chat-template tail one token per forward through the compressed cache before generating.

Shared prefill (``shared_prefill=True``, the default; ``--no-shared-prefill`` turns it off): per
sample, every pending job of our own methods is prefilled by one forward (eval/grid.py
``share_prefill``), then each continues through its own cache; results are those of separate
prefills. Peer jobs (``kvpress:*``) prefill alone, after them. A line's ``prefill_s`` is then the
job's own prefill (the shared forward less the other jobs' ``compress_s``) next to
``shared_prefill_s`` and ``shared_prefill_jobs``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from heterocache.eval.grid import Feeder, method_grid, open_jobs, pending
from heterocache.eval.results import RESULTS_GLOB, ResultLog, task_key
from heterocache.eval.tasks.base import Sample, encode_prompt

QUESTION_MODES = ("prefill", "decode")


@dataclass
class RunConfig:
    """What one run evaluates; ``settings_key()`` is part of every result's resume key."""

    out_dir: Path
    methods: list[str]
    keeps: list[float]
    suite: str = ""
    model_id: str = "model"
    question_mode: str = "prefill"
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_new_tokens: int | None = None  # overrides the per-task value when set
    prompt_settings: dict[str, Any] = field(default_factory=dict)  # what changes a sample's prompt (seed, chat..)
    shard: tuple[int, int] | None = None
    progress: bool = True
    shared_prefill: bool = True  # one prefill forward per sample for our methods (same results, less time)

    def settings_key(self) -> str:
        blob = json.dumps({"options": self.method_options, "max_new_tokens": self.max_new_tokens,
                           **({"prompt": self.prompt_settings} if self.prompt_settings else {})}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    def combos(self) -> list[tuple[str, float]]:
        """(method, keep) pairs; FullKV runs once at keep 1.0 whatever ``keeps`` says."""
        return method_grid(self.methods, self.keeps)

    def results_path(self) -> Path:
        if self.shard is None:
            return Path(self.out_dir) / "results.jsonl"
        index, count = self.shard
        return Path(self.out_dir) / f"results.shard{index}of{count}.jsonl"


def shard_from_env() -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` when launched by accelerate / torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else None


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``; ValueError naming the argument otherwise."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} must look like I/N, e.g. 0/2") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def _stop_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is not None:
            ids.update(source if isinstance(source, list | tuple) else [source])
    return ids


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop string that follows some non-blank output."""
    lead = len(text) - len(text.lstrip())
    hits = [i for i in (text.find(s, lead) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class _Session:
    """Greedy generation through one cache (a :class:`Feeder`, or a cache object wrapped in one):
    feeds ids, remembers the last logits (eval helper)."""

    def __init__(self, model, cache):
        self.feeder = cache if isinstance(cache, Feeder) else Feeder(model, cache=cache)
        self.device = model.device
        self.logits: torch.Tensor | None = None

    def forward(self, ids: list[int]) -> None:
        self.logits = self.feeder(torch.tensor([ids], device=self.device), logits_to_keep=1)[0, -1]

    def feed(self, ids: list[int], at_once: bool) -> None:
        """``at_once``: one forward (a prefill); else one forward per token (the decode path)."""
        if at_once:
            self.forward(ids)
        else:
            for token in ids:
                self.forward([token])

    def clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def answer(self, tokenizer, max_new_tokens: int, stop: Sequence[str], eos_ids: set[int]):
        """Greedy answer from the current logits: ``(text, generated ids, decode steps, unfed ids)``.

        The last generated token is not fed back unless the loop continues past it (``unfed``); an
        end-of-sequence token ends the answer and is never fed.
        """
        generated, text, steps = [], "", 0
        for _ in range(max_new_tokens):
            token = int(self.logits.argmax())
            if token in eos_ids:
                return text, generated, steps, []
            generated.append(token)
            text, stopped = _cut_at_stop(tokenizer.decode(generated, skip_special_tokens=True), stop)
            if stopped or len(generated) == max_new_tokens:
                return text, generated, steps, [token]
            self.forward([token])
            steps += 1
        return text, generated, steps, []


def prefill_ids(context_ids: list[int], rest_ids: list[int], question_mode: str) -> list[int]:
    """What the prefill forward covers: the whole prompt (``prefill`` mode) or the context (``decode``)."""
    return context_ids + rest_ids if question_mode == "prefill" else context_ids


def _prefill(session: _Session, ids: list[int], prefilled: tuple[torch.Tensor, dict] | None) -> dict:
    """Run the prefill of ``session`` (or take a shared one's ``(logits (V,), timing)``); its timing fields."""
    if prefilled is not None:
        session.logits = prefilled[0]
        return dict(prefilled[1])
    start = session.clock()
    session.forward(ids)
    return {"prefill_s": round(session.clock() - start, 4)}


@torch.inference_mode()
def generate_one(model, tokenizer, context_ids: list[int], rest_ids: list[int], cache, question_mode: str,
                 max_new_tokens: int, stop: Sequence[str] = (), eos_ids: set[int] | None = None,
                 prefilled: tuple[torch.Tensor, dict] | None = None) -> dict:
    """Greedy generation through ``cache``; returns the prediction, timings and token counts.

    ``prefilled``: ``(last logits (V,), timing fields)`` of a shared prefill that already filled
    ``cache`` (:func:`run_samples`); else this call prefills. ``tokens_per_s`` = decode forwards (one
    per generated token after the first, which comes from the prefill's logits) per second of the
    generation loop.
    """
    session = _Session(model, cache)
    eos_ids = _stop_ids(model, tokenizer) if eos_ids is None else eos_ids
    timing = _prefill(session, prefill_ids(context_ids, rest_ids, question_mode), prefilled)
    prefill_end = session.clock()
    if question_mode == "decode":
        session.feed(rest_ids, at_once=False)
    question_end = session.clock()
    text, generated, steps, _ = session.answer(tokenizer, max_new_tokens, stop, eos_ids)
    decode_s = session.clock() - question_end
    return {"prediction": text, "new_tokens": len(generated), "decode_steps": steps,
            **timing, "question_s": round(question_end - prefill_end, 4),
            "decode_s": round(decode_s, 4), "tokens_per_s": round(steps / decode_s, 3) if steps else None}


def next_turn_ids(tokenizer, sample: Sample, answers: list[str], question: str) -> list[int]:
    """Token ids that follow the last answer to ask ``question`` as a new user turn.

    ``answers``: the answers so far (one per question asked). With the chat template the whole
    conversation is rendered and the part after the last answer is returned (end of the assistant
    turn, the new user turn, the generation prompt).
    """
    if not sample.chat:
        return tokenizer("\n\n" + question + sample.answer_prefix, add_special_tokens=False, verbose=False)["input_ids"]
    questions = [sample.question] + [turn["question"] for turn in sample.extra["turns"]]
    messages = [{"role": "user", "content": sample.context + questions[0] + sample.answer_prefix}]
    for answer, asked in zip(answers[:-1], questions[1:]):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": asked}]
    before = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answers[-1]
    messages += [{"role": "assistant", "content": answers[-1]}, {"role": "user", "content": question}]
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not full.startswith(before):
        raise ValueError("the chat template rewrites earlier turns; sequential questions need a template that "
                         "only appends (or pass --no-chat)")
    return tokenizer(full[len(before):], add_special_tokens=False, verbose=False)["input_ids"]


@torch.inference_mode()
def generate_turns(model, tokenizer, sample: Sample, context_ids: list[int], rest_ids: list[int], cache,
                   question_mode: str, max_new_tokens: int, eos_ids: set[int],
                   prefilled: tuple[torch.Tensor, dict] | None = None) -> dict:
    """Compress once, ask many: the first question as in :func:`generate_one`, then every follow-up of
    ``sample.extra["turns"]`` as a new user turn fed through the decode path after the previous answer.
    Returns one prediction per question (``predictions``) plus timings: ``total_s`` = the prefill
    (with ``prefilled``: the job's own share, as in :func:`generate_one`) + everything after it."""
    session = _Session(model, cache)
    start = session.clock()
    timing = _prefill(session, prefill_ids(context_ids, rest_ids, question_mode), prefilled)
    if prefilled is not None:  # count the job's own prefill, not the wait for the shared one
        start -= timing["prefill_s"]
    if question_mode == "decode":
        session.feed(rest_ids, at_once=False)
    answers, new_tokens, steps, unfed = [], 0, 0, []
    for turn in [None, *sample.extra["turns"]]:
        if turn is not None:
            session.feed(unfed + next_turn_ids(tokenizer, sample, answers, turn["question"]), at_once=False)
        text, generated, turn_steps, unfed = session.answer(tokenizer, max_new_tokens, sample.stop, eos_ids)
        answers.append(text)
        new_tokens += len(generated)
        steps += turn_steps
    shared = {k: v for k, v in timing.items() if k != "prefill_s"}  # sequential lines carry no prefill_s
    return {"predictions": answers, "new_tokens": new_tokens, "decode_steps": steps,
            "total_s": round(session.clock() - start, 4), **shared}


def score_prediction(sample: Sample, prediction: str) -> float:
    """Score in [0, 1] with the sample's metric (eval/metrics.py, or a synthetic task's own)."""
    from heterocache.eval import metrics
    from heterocache.eval.tasks import niah

    if sample.metric in niah.METRICS:
        return float(niah.METRICS[sample.metric](prediction, sample.gold, sample))
    return metrics.score(sample.metric, prediction, sample.gold, sample)


def metrics_score(sample: Sample, prediction: str, gold: list[str]) -> float:
    """Score one answer of a multi-question sample against its own gold."""
    from dataclasses import replace

    return score_prediction(replace(sample, gold=gold), prediction)


def _shard(samples: Iterable[Sample], shard: tuple[int, int] | None) -> list[Sample]:
    samples = list(samples)
    return samples if shard is None else samples[shard[0]:: shard[1]]


def run_samples(model, tokenizer, samples: Iterable[Sample], config: RunConfig) -> Path:
    """Evaluate every (sample, method, keep) not yet in ``config.out_dir``; returns the results file.

    ``summary.json`` is the caller's to write (``eval.report.write_summary``, as the CLI does).
    """
    from tqdm.auto import tqdm

    from heterocache.models import check_prompt_length

    if config.question_mode not in QUESTION_MODES:
        raise ValueError(f"question_mode={config.question_mode!r}; choose one of {QUESTION_MODES}")
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[Sample]] = {}
    for sample in _shard(samples, config.shard):
        by_task.setdefault(sample.task, []).append(sample)
    eos_ids = _stop_ids(model, tokenizer)
    settings = config.settings_key()
    grid = config.combos()
    with ResultLog(config.results_path(), task_key, also_read=sorted(out_dir.glob(RESULTS_GLOB))) as log:
        for task, task_samples in by_task.items():
            todo = pending(task_samples, grid, lambda s, m, k: _key(config, settings, s, m, k) in log)
            total = len(task_samples) * len(grid)
            bar = tqdm(total=total, initial=total - sum(len(runs) for _, runs in todo), desc=task,
                       disable=not config.progress, unit="run", dynamic_ncols=True)
            for sample, runs in todo:
                context_ids, rest_ids = encode_prompt(tokenizer, sample)
                max_new = config.max_new_tokens or sample.max_new_tokens
                check_prompt_length(model, len(context_ids) + len(rest_ids), max_new)
                first = torch.tensor([prefill_ids(context_ids, rest_ids, config.question_mode)], device=model.device)
                for job in open_jobs(model, runs, config.method_options, first, config.shared_prefill,
                                     logits_to_keep=1):
                    method, keep, cache = job.method, job.keep, job.feeder
                    prefilled = None if job.logits is None else (job.logits[0, -1], job.timing)
                    if sample.extra.get("turns"):
                        out = generate_turns(model, tokenizer, sample, context_ids, rest_ids, cache,
                                             config.question_mode, max_new, eos_ids, prefilled)
                        golds = [sample.gold] + [turn["gold"] for turn in sample.extra["turns"]]
                        out["turns"] = [{"prediction": p, "gold": g, "score": metrics_score(sample, p, g)}
                                        for p, g in zip(out.pop("predictions"), golds)]
                        out["prediction"] = out["turns"][0]["prediction"]
                    else:
                        out = generate_one(model, tokenizer, context_ids, rest_ids, cache, config.question_mode,
                                           max_new, sample.stop, eos_ids, prefilled)
                    stats = cache.stats()
                    cache.close()
                    if "compress_s" in stats:  # our caches: the seconds their own compress took
                        out.setdefault("compress_s", round(stats["compress_s"], 4))
                    line = {
                        "suite": config.suite, "task": task, "sample_id": sample.sample_id, "method": method,
                        "keep": keep, "question_mode": config.question_mode, "model": config.model_id,
                        "settings": settings, "prediction": out.pop("prediction"), "gold": sample.gold,
                        "metric": sample.metric, "keep_fraction": stats.get("keep_fraction", 1.0),
                        "prompt_tokens": len(context_ids) + len(rest_ids), "context_tokens": len(context_ids),
                        **out, "chat": sample.chat,
                        "cache": {k: v for k, v in stats.items() if isinstance(v, int | float | str)},
                        "extra": {k: v for k, v in sample.extra.items() if isinstance(v, int | float | str | bool)},
                    }
                    line["score"] = (sum(t["score"] for t in line["turns"]) / len(line["turns"]) if "turns" in line
                                     else score_prediction(sample, line["prediction"]))
                    log.append(line)
                    bar.update(1)
            bar.close()
    return config.results_path()


def _key(config: RunConfig, settings: str, sample: Sample, method: str, keep: float) -> tuple:
    return (config.suite, sample.task, str(sample.sample_id), method, float(keep), config.question_mode,
            config.model_id, settings)
