"""LongBench v1 (21 tasks) and LongBench-E (13 tasks) from the official JSONL files.

Data: ``data.zip`` of the Hugging Face dataset THUDM/LongBench, unzipped; one ``{task}.jsonl``
(v1) or ``{task}_e.jsonl`` (LongBench-E) per task. Prompt instructions are paraphrased from the
official structure (spec/benchmarks.md section 1); the answer labels are exact. Pass the official
``dataset2prompt.json`` as ``templates`` to reproduce the original wording.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
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

HOW_TO_GET = ("download data.zip from the Hugging Face dataset THUDM/LongBench "
              "(https://huggingface.co/datasets/THUDM/LongBench) and unzip it into this directory")


@dataclass(frozen=True)
class TaskSpec:
    template: str
    metric: str
    max_new_tokens: int
    category: str
    question_marker: str | None  # start of the question part, searched after {context}
    answer_label: str  # the final label; in few-shot tasks it ends the record's ``input``
    label_in_input: bool = False
    chat: bool = True
    language: str = "en"
    in_e: bool = False  # part of LongBench-E


_QA_EN = "Answer the question using the passages given {where}. Reply with the answer only, without any other words."
_MULTI_DOC = (f"{_QA_EN.format(where='below')}\n\nThe following are given passages.\n{{context}}\n\n"
              f"{_QA_EN.format(where='above')}\n\nQuestion: {{input}}\nAnswer:")
_NARRATIVE = ("{lead} Answer the question asconcisely as you can, with a single phrase if possible, "
              "and give no explanation.")
_QASPER = ("Answer the question {about} with a single phrase or sentence where possible, as concisely as "
           "you can. If the article does not contain the answer, write \"unanswerable\". For a yes/no "
           "question, reply \"yes\", \"no\", or \"unanswerable\". Give no explanation.")
_CODE = "Please complete the code given below. \n{context}"

TASKS: dict[str, TaskSpec] = {
    "narrativeqa": TaskSpec(
        _NARRATIVE.format(lead="You will read a story (a novel or a movie script) and a question about it.")
        + "\n\nStory: {context}\n\n" + _NARRATIVE.format(lead="Now answer the question about the story.")
        + "\n\nQuestion: {input}\n\nAnswer:",
        "qa_f1", 128, "single-doc QA", "Question:", "Answer:"),
    "qasper": TaskSpec(
        "You will read a scientific article and a question about it. "
        + _QASPER.format(about="about the article below") + "\n\nArticle: {context}\n\n "
        + _QASPER.format(about="about the article above") + "\n\nQuestion: {input}\n\nAnswer:",
        "qa_f1", 128, "single-doc QA", "Question:", "Answer:", in_e=True),
    "multifieldqa_en": TaskSpec(
        "Read the text below and answer the question briefly.\n\n{context}\n\nNow answer the question "
        "using the text above. Reply with the answer only.\n\nQuestion: {input}\nAnswer:",
        "qa_f1", 64, "single-doc QA", "Question:", "Answer:", in_e=True),
    "multifieldqa_zh": TaskSpec(
        "阅读下面的文字，并简要回答问题。\n\n{context}\n\n现在请根据上面的文字回答问题，只输出答案。\n\n问题：{input}\n回答：",
        "qa_f1_zh", 64, "single-doc QA", "问题：", "回答：", language="zh"),
    "hotpotqa": TaskSpec(_MULTI_DOC, "qa_f1", 32, "multi-doc QA", "Question:", "Answer:", in_e=True),
    "2wikimqa": TaskSpec(_MULTI_DOC, "qa_f1", 32, "multi-doc QA", "Question:", "Answer:", in_e=True),
    "musique": TaskSpec(_MULTI_DOC, "qa_f1", 32, "multi-doc QA", "Question:", "Answer:"),
    "dureader": TaskSpec(
        "请根据下面的文章回答问题。\n\n文章：{context}\n\n请根据上面的文章回答问题。\n\n问题：{input}\n回答：",
        "rouge_zh", 128, "multi-doc QA", "问题：", "回答：", language="zh"),
    "gov_report": TaskSpec(
        "Below is a report written by a government agency. Write a one-page summary of it.\n\n"
        "Report:\n{context}\n\nNow write a one-page summary of the report.\n\nSummary:",
        "rouge_l", 512, "summarization", None, "Summary:", in_e=True),
    "qmsum": TaskSpec(
        "Below is the transcript of a meeting and a query about it. Answer the query in one or more "
        "sentences.\n\nTranscript:\n{context}\n\nNow answer the query using the transcript above, in one "
        "or more sentences.\n\nQuery: {input}\nAnswer:",
        "rouge_l", 512, "summarization", "Query:", "Answer:"),
    "multi_news": TaskSpec(
        "Below are several news passages. Write a one-page summary that covers all of them. \n\nNews:\n"
        "{context}\n\nNow write a one-page summary covering all of the news.\n\nSummary:",
        "rouge_l", 512, "summarization", None, "Summary:", in_e=True),
    "vcsum": TaskSpec(
        "下面是一份会议记录，请阅读后写出这次会议的总结。\n会议记录：\n{context}\n\n会议总结：",
        "rouge_zh", 512, "summarization", None, "会议总结：", language="zh"),
    "trec": TaskSpec(
        "Decide which type the question belongs to. Some examples are given below.\n\n{context}\n{input}",
        "classification", 64, "few-shot", "{input}", "Type:", True, chat=False, in_e=True),
    "triviaqa": TaskSpec(
        "Answer the question using the passage. Reply with the answer only, without any other words. "
        "Some examples are given below.\n\n{context}\n\n{input}",
        "qa_f1", 32, "few-shot", "{input}", "Answer:", True, chat=False, in_e=True),
    "samsum": TaskSpec(
        "Summarize the dialogue in a few short sentences. Some examples are given below.\n\n{context}\n\n{input}",
        "rouge_l", 128, "few-shot", "{input}", "Summary:", True, chat=False, in_e=True),
    "lsht": TaskSpec(
        "请判断下面这则新闻属于哪个类别。下面给出一些例子。\n\n{context}\n{input}",
        "classification", 64, "few-shot", "{input}", "类别：", True, chat=False, language="zh"),
    "passage_count": TaskSpec(
        "Below are several paragraphs taken from Wikipedia. Some of them may be exact duplicates of each "
        "other. Read them carefully and work out how many distinct paragraphs there are once the "
        "duplicates are removed.\n\n{context}\n\nGive the final number of distinct paragraphs after "
        "removing duplicates. Output only the number, for example 1, 2, 3 and so on.\n\nThe final answer is: ",
        "count", 32, "synthetic", None, "The final answer is: ", in_e=True),
    "passage_retrieval_en": TaskSpec(
        "Below are 30 paragraphs taken from Wikipedia, followed by an abstract. Work out which paragraph "
        "the abstract was written from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nGive "
        "the number of the paragraph the abstract comes from, in the form \"Paragraph 1\", \"Paragraph 2\", "
        "and so on.\n\nThe answer is: ",
        "retrieval", 32, "synthetic", "{input}", "The answer is: ", in_e=True),
    "passage_retrieval_zh": TaskSpec(
        "下面有30个段落，它们来自维基百科，后面附有其中一个段落的摘要。请判断这个摘要出自哪个段落。\n\n{context}\n\n"
        "下面是一个摘要\n\n{input}\n\n请给出摘要所属段落的编号，格式为\"段落1\"，\"段落2\"等。\n\n答案是：",
        "retrieval_zh", 32, "synthetic", "{input}", "答案是：", language="zh"),
    "lcc": TaskSpec(_CODE + "Next line of code:\n", "code_sim", 64, "code", None, "Next line of code:\n",
                    chat=False, in_e=True),
    "repobench-p": TaskSpec(_CODE + "{input}Next line of code:\n", "code_sim", 64, "code", "{input}",
                            "Next line of code:\n", chat=False, in_e=True),
}
ENGLISH_TASKS = [t for t, s in TASKS.items() if s.language == "en"]
CHINESE_TASKS = [t for t, s in TASKS.items() if s.language == "zh"]
E_TASKS = [f"{t}_e" for t, s in TASKS.items() if s.in_e]
CATEGORIES = {t: s.category for t, s in TASKS.items()}


def load_tasks(data_dir: str | Path | None, tasks: Sequence[str] | str | None = None, tokenizer=None,
               max_prompt_tokens: int | None = None, limit: int | None = None,
               chat_template: bool | None = None, problems: list[LoadProblem] | None = None,
               templates: Mapping[str, str] | None = None) -> Iterator[Sample]:
    """LongBench v1 samples, task by task. ``tasks``: names, or the groups ``en`` / ``zh``; None = all 21.

    ``chat_template`` overrides the per-task chat flag; ``problems`` collects skipped records;
    ``templates`` maps task -> full prompt template (e.g. the official dataset2prompt.json).
    """
    names = resolve_tasks(tasks, list(TASKS), list(TASKS), "longbench",
                          groups={"en": ENGLISH_TASKS, "zh": CHINESE_TASKS})
    yield from _load(data_dir, names, "", tokenizer, max_prompt_tokens, limit, chat_template, problems,
                     templates)


def load_tasks_e(data_dir: str | Path | None, tasks: Sequence[str] | str | None = None, tokenizer=None,
                 max_prompt_tokens: int | None = None, limit: int | None = None,
                 chat_template: bool | None = None, problems: list[LoadProblem] | None = None,
                 templates: Mapping[str, str] | None = None) -> Iterator[Sample]:
    """LongBench-E samples from ``{task}_e.jsonl``; tasks named ``qasper_e`` (or plain ``qasper``)."""
    aliases = {t.removesuffix("_e"): t for t in E_TASKS}
    names = resolve_tasks(tasks, E_TASKS, E_TASKS, "longbench_e", aliases=aliases)
    yield from _load(data_dir, [t.removesuffix("_e") for t in names], "_e", tokenizer, max_prompt_tokens,
                     limit, chat_template, problems, templates)


def _load(data_dir, names, suffix, tokenizer, max_prompt_tokens, limit, chat_template, problems,
          templates) -> Iterator[Sample]:
    suite = "longbench_e" if suffix else "longbench"
    paths = {name: find_data_file(data_dir, f"{name}{suffix}.jsonl", suite, HOW_TO_GET) for name in names}
    for name, path in paths.items():
        spec = TASKS[name]
        template = (templates or {}).get(name, spec.template)
        label = None if spec.label_in_input else spec.answer_label
        parts = split_template(template, spec.question_marker, label, name)
        loaded = 0
        for line, record in read_records(path, problems):
            if limit is not None and loaded >= limit:
                break
            try:
                sample = _sample(name + suffix, spec, parts, record, line, tokenizer, max_prompt_tokens,
                                 chat_template)
            except (KeyError, TypeError, ValueError, IndexError) as err:
                report_problem(problems, LoadProblem(str(path), line, f"bad record: {err!r}"))
                continue
            loaded += 1
            yield sample


def _sample(task, spec: TaskSpec, parts, record, line, tokenizer, max_prompt_tokens, chat_template) -> Sample:
    fields = {**record, "context": record["context"], "input": record.get("input") or ""}
    context, question, answer = (part.format(**fields) for part in parts)
    if spec.label_in_input and question.endswith(spec.answer_label):
        # kvpress-style split: the trailing "Type:" / "Answer:" / "Summary:" of the input is the label
        question, answer = question[: -len(spec.answer_label)], spec.answer_label
    answers = record["answers"]
    if isinstance(answers, str) or not answers:
        raise ValueError("'answers' must be a non-empty list of strings")
    extra = {"length": record.get("length"), "language": record.get("language", spec.language),
             "category": spec.category}
    if spec.metric == "classification":
        extra["all_classes"] = list(record["all_classes"])
    if task.startswith("samsum"):
        extra["min_new_tokens"] = 1  # the official run forces one new token before the newline stop
    return make_sample(
        task=task, sample_id=str(record.get("_id") or f"{task}-{line}"), context=context, question=question,
        answer_prefix=answer, gold=[str(a) for a in answers], metric=spec.metric,
        max_new_tokens=spec.max_new_tokens, chat=spec.chat if chat_template is None else chat_template,
        stop=["\n"] if task.startswith("samsum") else [], extra=extra, tokenizer=tokenizer,
        max_prompt_tokens=max_prompt_tokens)
