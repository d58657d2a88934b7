"""InfiniteBench (12 tasks) from the official ``{task}.jsonl`` files (spec/benchmarks.md section 3).

Data: the Hugging Face dataset xinrongzhang2022/InfiniteBench, one JSONL per task with fields
``id``, ``context``, ``input``, ``answer`` (list; str or int items), ``options``. Templates follow
the open-model set (instructions paraphrased, answer labels exact). The default task list is the
10 tasks the official HeteroCache runs (all but code_run and math_calc; group ``all`` adds them).
The chat template is applied by default, as in the official HeteroCache run; the original
open-model runs used raw prompts (``chat_template=False``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from heterocache.eval.tasks.base import Sample
from heterocache.eval.tasks.common import (
    LoadProblem,
    find_data_file,
    make_sample,
    read_records,
    report_problem,
    resolve_tasks,
    split_template,
)

HOW_TO_GET = ("download the task files from the Hugging Face dataset xinrongzhang2022/InfiniteBench "
              "(https://huggingface.co/datasets/xinrongzhang2022/InfiniteBench) into this directory")


@dataclass(frozen=True)
class TaskSpec:
    template: str
    metric: str
    max_new_tokens: int
    question_marker: str | None
    answer_label: str


_HIDDEN = ("There is an important piece of information hidden inside a lot of irrelevant text. "
           "Find it{memo}, because you will be asked about it.\n\n{{context}}\n\n{{input}}\n\n")
_OPTIONS = "A. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\n"
_CALC = ("Work out the running values of the long arithmetic expression below from left to right and "
         "list every intermediate result.\n\nExpression: 1 + 3 + 4\nValues: [1, 4, 8]\n\n"
         "Expression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: {context}\nValues:")

TASKS: dict[str, TaskSpec] = {
    "passkey": TaskSpec(_HIDDEN.format(memo=" and memorize it") + "The pass key is",
                        "first_int_match", 6, "{input}", "The pass key is"),
    "number_string": TaskSpec(_HIDDEN.format(memo="") + "The sequence of digits is",
                              "first_int_match", 12, "{input}", "The sequence of digits is"),
    "kv_retrieval": TaskSpec(
        "Extract the value that belongs to the given key from the JSON object below.\n\n{context}\n\n{input}",
        "kv_match", 50, "{input}", ""),
    "longbook_sum_eng": TaskSpec("Write a summary of the book below.\n\n{context}\n\nSummary:",
                                 "rouge_lsum", 1200, None, "Summary:"),
    "longbook_choice_eng": TaskSpec(
        "Read the book below and answer the question that follows.\n\n{context}\n\nQuestion: {question}\n"
        + _OPTIONS + "The letter of the correct answer is",
        "ib_choice", 40, "Question:", "The letter of the correct answer is"),
    "longbook_qa_eng": TaskSpec(
        "Read the book below and answer the question as briefly as you can.\n\n{context}\n\n"
        "Question: {question}\nAnswer:", "qa_f1", 40, "Question:", "Answer:"),
    "longbook_qa_chn": TaskSpec("请阅读下面的书，然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
                                "qa_f1_zh_char", 40, "问题：", "答案："),
    "longdialogue_qa_eng": TaskSpec(
        "Below is the script of a dialogue in which one occurrence of a character's name has been replaced "
        "by \"$$MASK$$\". Work out which character it is.\n\n{context}\n\n"
        "The name that has been replaced with $$MASK$$ is likely",
        "ib_dialogue", 40, None, "The name that has been replaced with $$MASK$$ is likely"),
    "math_find": TaskSpec("{prefix}\n\n{context}\n\n{input}", "ib_math_find", 3, "{input}", ""),
    "math_calc": TaskSpec(_CALC, "ib_math_calc", 30000, None, "Values:"),
    "code_run": TaskSpec(
        "The Python code below defines a function called {func}.\n\n{context}\n\nWork out the exact value "
        "of {func_call}. The value of {func_call} is", "ib_code_run", 5, "Work out", "The value of"),
    "code_debug": TaskSpec(
        "The Python code below contains several functions, and exactly one of them has a deliberate error "
        "that makes it crash. Find that function.\n\n{context}\n\nOptions:\n" + _OPTIONS
        + "The correct option is:", "ib_code_debug", 5, "Options:", "The correct option is:"),
}
DEFAULT_TASKS = [t for t in TASKS if t not in ("code_run", "math_calc")]
_CHOICE_TASKS = ("longbook_choice_eng", "code_debug")
_TYPED_TASKS = ("code_run", "math_find", "math_calc")


def _fields(task: str, record: dict) -> dict:
    text_input = str(record.get("input") or "")
    fields = {"context": record["context"], "input": text_input, "question": text_input}
    if task in _CHOICE_TASKS:
        options = record.get("options") or []
        if len(options) < 4:
            raise ValueError(f"needs 4 options, got {len(options)}")
        fields.update({f"OPTION_{x}": options[i] for i, x in enumerate("ABCD")})
    elif task == "math_find":
        match = re.search(r"The .+ of", text_input)
        if match is None:
            raise ValueError("no 'The ... of' target in the input")
        fields["prefix"] = f"What is {match.group(0).lower()[:-3]} in the following list?"
    elif task == "code_run":
        match = re.search(r"func_[0-9]+\(-?[0-9]+\)", text_input)
        if match is None:
            raise ValueError("no func_N(x) call in the input")
        fields["func_call"], fields["func"] = match.group(0), match.group(0).split("(")[0]
    return fields


def _gold(task: str, record: dict) -> list[str]:
    answer = record["answer"]
    if task in _CHOICE_TASKS:  # [answer text, letter], the letter from the answer's option position
        if isinstance(answer, list) and len(answer) == 2 and answer[1] in ("A", "B", "C", "D"):
            return [str(answer[0]), answer[1]]
        text = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
        return [str(text), "ABCD"[record["options"].index(text)]]
    if task == "math_calc":
        return [json.dumps(answer[0] if answer and isinstance(answer[0], list) else answer)]
    answers = answer if isinstance(answer, list) else [answer]
    if not answers:
        raise ValueError("empty answer list")
    return [str(a) for a in answers]


def load_tasks(data_dir: str | Path | None, tasks: Sequence[str] | str | None = None, tokenizer=None,
               max_prompt_tokens: int | None = None, limit: int | None = None,
               chat_template: bool | None = None, problems: list[LoadProblem] | None = None
               ) -> Iterator[Sample]:
    """InfiniteBench samples; ``tasks`` None = the 10 reference tasks, ``all`` = all 12."""
    names = resolve_tasks(tasks, list(TASKS), DEFAULT_TASKS, "infinitebench", groups={"all": list(TASKS)})
    paths = {t: find_data_file(data_dir, f"{t}.jsonl", "infinitebench", HOW_TO_GET) for t in names}
    for task, path in paths.items():
        spec = TASKS[task]
        parts = split_template(spec.template, spec.question_marker, spec.answer_label, task)
        loaded = 0
        for line, record in read_records(path, problems):
            if limit is not None and loaded >= limit:
                break
            try:
                fields = _fields(task, record)
                context, question, answer_prefix = (part.format(**fields) for part in parts)
                gold = _gold(task, record)
            except (KeyError, TypeError, ValueError, IndexError) as err:
                report_problem(problems, LoadProblem(str(path), line, f"bad record: {err!r}"))
                continue
            extra = {"answer": record["answer"]} if task in _TYPED_TASKS else {}
            loaded += 1
            yield make_sample(
                task=task, sample_id=str(record.get("id", f"{task}-{line}")), context=context,
                question=question, answer_prefix=answer_prefix, gold=gold, metric=spec.metric,
                max_new_tokens=spec.max_new_tokens, chat=True if chat_template is None else chat_template,
                extra=extra, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens)
