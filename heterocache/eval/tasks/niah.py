"""Needle in a haystack over the Paul Graham essays (spec/benchmarks.md section 6, KV-paper variant).

For each context length ``L`` the haystack is the first ``L - 200`` essay tokens (200 left for the
question and answer), cut further so that haystack + needle fit; the needle goes after the full stop
at or before token ``int(len * depth)`` (depth 1.0 appends). The prompt wraps the text as a story
book, no chat template; greedy, 30 new tokens, stop at a newline.

Score: ROUGE-1 **recall** of the needle's words in the answer (rouge-score tokenizer, Porter
stemmer): how much of the needle came back, indifferent to extra words. ``metric="niah_rouge1_f"``
gives the KV papers' ROUGE-1 F instead (they report it x10).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

from heterocache.eval.tasks.base import Sample
from heterocache.eval.tasks.common import resolve_tasks
from heterocache.eval.tasks.essays import period_token_ids
from heterocache.eval.tasks.passkey import essay_tokens, splice_at_depth

TASKS = ("niah",)
NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "The best thing to do in San Francisco is: "
ORIGINAL_QUESTION = "What is the best thing to do in San Francisco?"
DEFAULT_LENGTHS = (1000, 2000, 4000)
DEFAULT_DEPTHS = (0.0, 0.11, 0.22, 0.33, 0.44, 0.56, 0.67, 0.78, 0.89, 1.0)
ANSWER_BUFFER = 200


@functools.cache
def _rouge1():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def niah_rouge1_recall(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    """Fraction of the needle's (stemmed, lower-cased) words present in ``prediction``; max over gold."""
    return max(_rouge1().score(g.strip(), prediction)["rouge1"].recall for g in gold)


def niah_rouge1_f(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    """ROUGE-1 F of (needle, prediction), Porter stemmer; the KV papers report this x10."""
    return max(_rouge1().score(g.strip(), prediction)["rouge1"].fmeasure for g in gold)


METRICS = {fn.__name__: fn for fn in (niah_rouge1_recall, niah_rouge1_f)}


def load(data_dir=None, tasks: Sequence[str] | str | None = None, tokenizer=None,
         max_prompt_tokens: int | None = None, limit: int | None = None, chat_template: bool | None = None,
         problems=None, *, lengths: Sequence[int] = DEFAULT_LENGTHS,
         depths: Sequence[float] = DEFAULT_DEPTHS, text_dir=None, needle: str = NEEDLE,
         question: str = QUESTION, metric: str = "niah_rouge1_recall",
         max_new_tokens: int = 30) -> Iterator[Sample]:
    """One sample per (length, depth), length-major; ``limit`` caps the total."""
    resolve_tasks(tasks, TASKS, TASKS, "niah")
    if tokenizer is None:
        raise ValueError("niah needs a tokenizer (context lengths are counted in tokens)")
    if metric not in METRICS:
        raise ValueError(f"niah metric {metric!r} is unknown; valid: {', '.join(METRICS)}")
    needle_len = len(tokenizer(needle, add_special_tokens=False, verbose=False)["input_ids"])
    too_short = [n for n in lengths if n - ANSWER_BUFFER <= needle_len]
    if too_short:
        raise ValueError(f"niah lengths {too_short} leave no room for a haystack "
                         f"(each needs > {ANSWER_BUFFER} + {needle_len} tokens)")
    period_ids = period_token_ids(tokenizer)
    all_tokens = essay_tokens(tokenizer, max(lengths), text_dir)
    count = 0
    for length in lengths:
        haystack = all_tokens[: length - ANSWER_BUFFER - needle_len]
        for depth in depths:
            if limit is not None and count >= limit:
                return
            text, position = splice_at_depth(tokenizer, haystack, needle, depth, period_ids)
            count += 1
            yield Sample(
                task="niah", sample_id=f"len{length}-depth{depth:g}",
                context=f"This is a very long story book: <book> {text} </book>.\n",
                question=f"Based on the content of the book, Question: {question}\n", answer_prefix="Answer:",
                gold=[needle.strip()], metric=metric, max_new_tokens=max_new_tokens,
                chat=False if chat_template is None else chat_template, stop=["\n"],
                extra={"length": length, "depth": depth, "insert_token": position},
            )
