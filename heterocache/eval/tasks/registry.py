"""Benchmark suites by name. Every loader takes the same keywords and yields ``Sample``s:

    load(data_dir, tasks=None, tokenizer=None, max_prompt_tokens=None, limit=None,
         chat_template=None, problems=None, **suite_options) -> Iterator[Sample]

Add a suite with ``register_suite(name, load, tasks, default_tasks)``; synthetic suites ignore
``data_dir`` (pass None).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heterocache.eval.tasks import infinitebench, longbench, longbench_v2, niah, passkey, ruler
from heterocache.eval.tasks.base import Sample
from heterocache.eval.tasks.common import LoadProblem


@dataclass(frozen=True)
class Suite:
    load: Callable[..., Iterator[Sample]]
    tasks: tuple[str, ...]  # every valid task name
    default_tasks: tuple[str, ...]  # what ``tasks=None`` loads
    needs_data: bool = True


TASK_SUITES: dict[str, Suite] = {}


def register_suite(name: str, load: Callable[..., Iterator[Sample]], tasks: Sequence[str],
                   default_tasks: Sequence[str] | None = None, needs_data: bool = True) -> None:
    TASK_SUITES[name] = Suite(load, tuple(tasks), tuple(tasks if default_tasks is None else default_tasks),
                              needs_data)


register_suite("longbench", longbench.load_tasks, list(longbench.TASKS))
register_suite("longbench_e", longbench.load_tasks_e, longbench.E_TASKS)
register_suite("longbench_v2", longbench_v2.load_tasks, longbench_v2.TASKS, longbench_v2.TASKS[:1])
register_suite("infinitebench", infinitebench.load_tasks, list(infinitebench.TASKS),
               infinitebench.DEFAULT_TASKS)
for _name, _module in (("passkey", passkey), ("niah", niah), ("ruler", ruler)):  # synthetic: no data_dir
    register_suite(_name, _module.load, _module.TASKS, needs_data=False)


def _suite(name: str) -> Suite:
    if name not in TASK_SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(TASK_SUITES)}")
    return TASK_SUITES[name]


def list_tasks(suite: str | None = None) -> dict[str, list[str]] | list[str]:
    """All task names of ``suite``, or a dict suite -> task names."""
    if suite is not None:
        return list(_suite(suite).tasks)
    return {name: list(s.tasks) for name, s in TASK_SUITES.items()}


def load_suite(suite: str, data_dir: str | Path | None = None, tasks: Sequence[str] | str | None = None,
               tokenizer=None, max_prompt_tokens: int | None = None, limit: int | None = None,
               chat_template: bool | None = None, problems: list[LoadProblem] | None = None,
               **options: Any) -> Iterator[Sample]:
    """Samples of ``suite`` (see ``TASK_SUITES``); ``options`` go to the suite's loader."""
    return _suite(suite).load(data_dir, tasks=tasks, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens,
                              limit=limit, chat_template=chat_template, problems=problems, **options)
