"""The result log shared by ``heterocache eval`` (runner, fidelity) and ``heterocache bench``.

One JSON object per line. Every line is flushed and fsync'ed before the next job starts, so a
killed run loses at most the job in flight. Bytes after the last newline are a line cut mid-write:
reading ignores them and ``ResultLog`` cuts them from its own file, so that job runs again and its
line is appended cleanly. A rerun skips every job whose key is already in the log (resume).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path

RESULTS_GLOB = "results*.jsonl"  # the runner's files (one per shard)
FIDELITY_GLOB = "fidelity*.jsonl"


def task_key(line: dict) -> tuple:
    """Resume key of a task result (eval/runner.py)."""
    return (line.get("suite", ""), line["task"], str(line["sample_id"]), line["method"], float(line["keep"]),
            line["question_mode"], line["model"], line.get("settings", ""))


def fidelity_key(line: dict) -> tuple:
    """Resume key of a fidelity result (eval/fidelity.py)."""
    return (line["window"], line["method"], float(line["keep"]), line["model"], line.get("settings", ""))


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Parsed lines of ``path``. Bytes after the last newline are a line killed mid-write: they are
    ignored, and cut from the file when ``repair`` (so the job is rerun and appended cleanly).
    Unparsable complete lines are skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    complete_end = raw.rfind(b"\n") + 1
    lines = []
    for number, chunk in enumerate(raw[:complete_end].split(b"\n"), 1):
        if not chunk.strip():
            continue
        try:
            lines.append(json.loads(chunk))
        except (json.JSONDecodeError, UnicodeDecodeError):
            warnings.warn(f"{path}:{number}: unparsable result line skipped", stacklevel=2)
    if repair and complete_end < len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(complete_end)
    return lines


def append_result(handle, line: dict) -> None:
    """Write one result line and make it durable before the next job starts (resume safety)."""
    handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


class ResultLog:
    """The lines of one result file, read back (and repaired) at open, appended as jobs finish.

    ``key(line)`` is the resume key; ``done`` holds the keys of ``path`` and of ``also_read``
    (e.g. the other shards of a run, read without repair: another process may be writing them).
    ``path=None`` keeps the lines in memory only. ``upgrade`` fills fields that older lines lack.
    Use as a context manager (or call ``close``).
    """

    def __init__(self, path: Path | None, key: Callable[[dict], Hashable], also_read: Iterable[Path] = (),
                 upgrade: Callable[[dict], dict] | None = None):
        self.path = Path(path) if path is not None else None
        self.key = key
        self.lines = read_jsonl(self.path, repair=True) if self.path is not None else []
        others = [line for p in also_read if self.path is None or Path(p) != self.path for line in read_jsonl(p)]
        if upgrade is not None:
            self.lines = [upgrade(line) for line in self.lines]
            others = [upgrade(line) for line in others]
        self.done: set = set()
        for line in self.lines + others:
            try:
                self.done.add(key(line))
            except KeyError:  # a line of another format: never a finished job
                continue
        self._handle = None

    def __contains__(self, key: Hashable) -> bool:
        return key in self.done

    def append(self, line: dict) -> None:
        self.lines.append(line)
        self.done.add(self.key(line))
        if self.path is None:
            return
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        append_result(self._handle, line)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
