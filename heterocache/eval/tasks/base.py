"""The sample format every task loader produces (consumed by eval/runner.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One evaluation item, already formatted and truncated for a given tokenizer.

    ``context`` + ``question`` + ``answer_prefix`` concatenated is the full user prompt. The runner
    applies the chat template (when ``chat`` is True) and, in ``--question-mode decode``, prefills
    only ``context`` and feeds the rest token by token through the compressed cache (DESIGN s.7).
    ``gold`` is a list of acceptable answers; ``metric`` names a function in eval/metrics.py.
    """

    task: str
    sample_id: str
    context: str
    question: str
    answer_prefix: str
    gold: list[str]
    metric: str
    max_new_tokens: int
    chat: bool = True
    stop: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.context + self.question + self.answer_prefix
