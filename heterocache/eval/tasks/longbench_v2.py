"""LongBench v2: 503 four-choice questions from the official ``data.json`` (spec/benchmarks.md s.2).

Tasks: ``longbench_v2`` (0-shot, the default: document, question, choices, answer-format line) and
``longbench_v2_nocontext`` (question and choices only, a no-document floor). Scored with
``choice_v2`` (explicit "The correct answer is (X)" only); ``metric`` picks a lenient or
compensated variant. Chat template always on by default (one user turn).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from heterocache.eval.tasks.base import Sample
from heterocache.eval.tasks.common import (
    LoadProblem,
    find_data_file,
    make_sample,
    read_records,
    report_problem,
    resolve_tasks,
)

HOW_TO_GET = ("download data.json from the Hugging Face dataset THUDM/LongBench-v2 "
              "(https://huggingface.co/datasets/THUDM/LongBench-v2) into this directory")
TASKS = ["longbench_v2", "longbench_v2_nocontext"]
METRICS = ("choice_v2", "choice_v2_lenient", "choice_v2_compensated")
MAX_NEW_TOKENS = 128
FORMAT_LINE = 'Format your response as follows: "The correct answer is (insert answer here)".'
_REQUIRED = ("question", "choice_A", "choice_B", "choice_C", "choice_D", "answer")


def _question_part(record: dict, with_context: bool) -> str:
    lines = [f"What is the correct answer to this question: {record['question'].strip()}", "Choices:"]
    lines += [f"({x}) {str(record[f'choice_{x}']).strip()}" for x in "ABCD"]
    request = "" if with_context else "Pick the single most likely answer choice. "
    return "\n".join(lines) + f"\n\n{request}{FORMAT_LINE}"


def load_tasks(data_dir: str | Path | None, tasks: Sequence[str] | str | None = None, tokenizer=None,
               max_prompt_tokens: int | None = None, limit: int | None = None,
               chat_template: bool | None = None, problems: list[LoadProblem] | None = None,
               metric: str = "choice_v2") -> Iterator[Sample]:
    """LongBench v2 samples; ``extra`` carries difficulty, length (short/medium/long), domain."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    names = resolve_tasks(tasks, TASKS, TASKS[:1], "longbench_v2")
    path = find_data_file(data_dir, "data.json", "longbench_v2", HOW_TO_GET)
    for task in names:
        with_context = task == "longbench_v2"
        loaded = 0
        for line, record in read_records(path, problems):
            if limit is not None and loaded >= limit:
                break
            missing = [k for k in _REQUIRED + (("context",) if with_context else ()) if k not in record]
            if missing or str(record["answer"]).strip() not in ("A", "B", "C", "D"):
                why = f"missing fields {missing}" if missing else f"answer {record['answer']!r} is not A-D"
                report_problem(problems, LoadProblem(str(path), line, why))
                continue
            context = ""
            if with_context:
                context = ("Read the text below carefully, then answer the question that follows.\n\n"
                           f"<text>\n{str(record['context']).strip()}\n</text>\n\n")
            loaded += 1
            yield make_sample(
                task=task, sample_id=str(record.get("_id") or f"{task}-{line}"), context=context,
                question=_question_part(record, with_context), answer_prefix="",
                gold=[str(record["answer"]).strip()], metric=metric, max_new_tokens=MAX_NEW_TOKENS,
                chat=True if chat_template is None else chat_template,
                extra={k: record.get(k) for k in ("difficulty", "length", "domain", "sub_domain")},
                tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens)
