"""Shared loader plumbing: finding files, reading JSON/JSONL with per-line problems, task-name
resolution, template splitting and middle truncation (spec/benchmarks.md section 0)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heterocache.eval.tasks.base import Sample


@dataclass(frozen=True)
class LoadProblem:
    """A record that could not be loaded; the rest of the file still is."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def report_problem(problems: list[LoadProblem] | None, problem: LoadProblem) -> None:
    """Warn about ``problem`` and append it to the caller's list (when one was given)."""
    warnings.warn(f"skipped record: {problem}", stacklevel=3)
    if problems is not None:
        problems.append(problem)


def find_data_file(data_dir: str | Path | None, filename: str, suite: str, how_to_get: str) -> Path:
    """``data_dir/filename`` (or ``data_dir/data/filename``, the layout of unzipped archives)."""
    if data_dir is None:
        raise ValueError(f"{suite}: data_dir is required ({how_to_get})")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{suite}: data directory {root} does not exist; {how_to_get}")
    for candidate in (root / filename, root / "data" / filename):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{suite}: expected file {filename!r} in {root} (or {root / 'data'}); {how_to_get}"
    )


def read_records(path: Path, problems: list[LoadProblem] | None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` from a JSONL file or a JSON array (element index + 1).

    A malformed JSONL line is reported and skipped; an unparsable JSON array is an error.
    """
    with open(path, encoding="utf-8") as handle:
        first = handle.read(4096).lstrip()
        handle.seek(0)
        if first.startswith("["):
            try:
                items = json.load(handle)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{err.lineno}: invalid JSON array: {err.msg}") from err
            numbered: Iterator[tuple[int, Any]] = enumerate(items, 1)
        else:
            numbered = _jsonl_lines(path, handle, problems)
        for number, record in numbered:
            if isinstance(record, dict):
                yield number, record
            else:
                report_problem(problems, LoadProblem(str(path), number, "record is not a JSON object"))


def _jsonl_lines(path: Path, handle, problems: list[LoadProblem] | None) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            message = f"malformed JSON line ({err.msg} at column {err.colno})"
            report_problem(problems, LoadProblem(str(path), number, message))


def resolve_tasks(requested: Sequence[str] | str | None, valid: Sequence[str], default: Sequence[str],
                  suite: str, groups: Mapping[str, Sequence[str]] | None = None,
                  aliases: Mapping[str, str] | None = None) -> list[str]:
    """Expand group names and aliases; unknown names raise a ValueError that lists the valid ones."""
    if requested is None:
        return list(default)
    if isinstance(requested, str):
        requested = [t for t in requested.split(",") if t.strip()]
    groups, aliases = groups or {}, aliases or {}
    out: list[str] = []
    for name in (t.strip() for t in requested):
        names = groups.get(name) or [aliases.get(name, name)]
        for task in names:
            if task not in valid:
                extra = f"; groups: {', '.join(groups)}" if groups else ""
                raise ValueError(f"unknown {suite} task {name!r}; valid tasks: {', '.join(valid)}{extra}")
            if task not in out:
                out.append(task)
    return out


def split_template(template: str, question_marker: str | None, answer_label: str | None,
                   task: str) -> tuple[str, str, str]:
    """Cut a full prompt template into (context part, question part, answer label).

    The question part starts at the first ``question_marker`` after ``{context}`` (None: no
    question), the answer label at the last ``answer_label`` (None: it is at the end of the input).
    """
    ctx_end = template.find("{context}")
    if ctx_end < 0:
        raise ValueError(f"{task}: prompt template has no {{context}} placeholder")
    ctx_end += len("{context}")
    answer_at = len(template) if answer_label is None else template.rfind(answer_label)
    question_at = answer_at if question_marker is None else template.find(question_marker, ctx_end)
    if answer_at < ctx_end or question_at < 0 or question_at > answer_at:
        raise ValueError(f"{task}: prompt template must contain {{context}}, then {question_marker!r}, "
                         f"then {answer_label!r}")
    return template[:question_at], template[question_at:answer_at], template[answer_at:]


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def truncate_middle(text: str, tokenizer, max_tokens: int) -> tuple[str, int]:
    """Keep the first and last ``max_tokens // 2`` tokens of ``text``; return (text, tokens before).

    Both halves are decoded with special tokens skipped and concatenated as strings (the caller
    re-tokenizes), exactly as the official LongBench / InfiniteBench scripts do.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text, len(ids)
    half = max_tokens // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[len(ids) - half:], skip_special_tokens=True)
    return head + tail, len(ids)


def make_sample(*, context: str, question: str, answer_prefix: str, tokenizer=None,
                max_prompt_tokens: int | None = None, **fields: Any) -> Sample:
    """Build a Sample, middle-truncating the whole prompt to ``max_prompt_tokens`` tokens.

    The cut normally falls inside the context: the truncated prompt then still ends with
    ``question + answer_prefix`` and the split is kept. When it does not (the cut reached the
    question, or decoding changed the text) the question and answer prefix are kept whole and the
    context alone is cut to the remaining budget; ``extra['truncation']`` records which happened.
    """
    extra = dict(fields.pop("extra", {}))
    if max_prompt_tokens is not None:
        if tokenizer is None:
            raise ValueError("max_prompt_tokens needs a tokenizer")
        if max_prompt_tokens < 2:
            raise ValueError(f"max_prompt_tokens must be >= 2, got {max_prompt_tokens}")
        suffix = question + answer_prefix
        truncated, n_tokens = truncate_middle(context + suffix, tokenizer, max_prompt_tokens)
        extra["prompt_tokens"] = n_tokens
        if n_tokens > max_prompt_tokens:
            if truncated.endswith(suffix):
                context, extra["truncation"] = truncated[: len(truncated) - len(suffix)], "middle"
            else:
                budget = max(max_prompt_tokens - count_tokens(tokenizer, suffix), 2)
                context, _ = truncate_middle(context, tokenizer, budget)
                extra["truncation"] = "middle-context-only"
    return Sample(context=context, question=question, answer_prefix=answer_prefix, extra=extra, **fields)
