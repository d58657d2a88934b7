"""The sample format every task loader produces, and its tokenisation (both question modes use it)."""

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


def encode_prompt(tokenizer, sample: Sample) -> tuple[list[int], list[int]]:
    """``(context_ids, rest_ids)``: the prompt's token ids, split where the question starts.

    With ``sample.chat`` the user turn is ``context + question (+ answer_prefix)`` inside the chat
    template, tokenised with ``add_special_tokens=False`` (the template carries BOS); the answer
    prefix follows the assistant header when ``sample.extra['answer_after_template']`` (RULER).
    Both question modes use these same ids.
    """
    if sample.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"task {sample.task!r} asks for the chat template but the tokenizer has none; "
                             "pass --no-chat")
        after = bool(sample.extra.get("answer_after_template"))
        user = sample.context + sample.question + ("" if after else sample.answer_prefix)
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        start = text.find(user)
        if start < 0:
            raise ValueError("the chat template altered the user text; cannot split context and question")
        cut = start + len(sample.context)
        head, tail = text[:cut], text[cut:] + (sample.answer_prefix if after else "")
        special = False
    else:
        head, tail, special = sample.context, sample.question + sample.answer_prefix, True
    context_ids = tokenizer(head, add_special_tokens=special, verbose=False)["input_ids"]
    rest_ids = tokenizer(tail, add_special_tokens=False, verbose=False)["input_ids"]
    return list(context_ids), list(rest_ids)
