"""Pass key retrieval in the Paul Graham essays (the PEERS.md protocol is the default).

Haystack = the first ``length`` tokens of the essays (concatenated in file-name order); the sentence
``The pass key is K. Remember it. K is the pass key.`` is spliced in after the full stop at or before
token ``int(length * depth)``; the user turn is the haystack, a blank line and the question; chat
template on; greedy, 10 new tokens; a hit when the key appears in the output (``string_match_part``).
Keys are 5-digit integers, ``samples`` per depth, each drawn from ``random.Random(f"{seed}:{depth}:{i}")``
so a sample's key does not depend on which other lengths / depths are run (same key at every length).

``sequential=N`` (N >= 2, "compress once, ask many"): each sample hides N differently named keys
("The first pass key is K. ...") at depths ``(i + 0.5) / N`` and asks for them one after the other,
each question (a new user turn) answered before the next is asked; the runner scores the fraction
of questions answered (``extra["turns"]`` holds the follow-up questions and their keys).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from heterocache.eval.tasks.base import Sample
from heterocache.eval.tasks.common import resolve_tasks
from heterocache.eval.tasks.essays import essay_text, period_token_ids, snap_to_period

TASKS = ("passkey",)
PASS_KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
DEFAULT_LENGTHS = (1500,)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
DEFAULT_SEED = 1234
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
NAMED_SENTENCE = "The {name} pass key is {key}. Remember it. {key} is the {name} pass key."
NAMED_QUESTION = "What is the {name} pass key? Answer with the number only."


def essay_tokens(tokenizer, n_tokens: int, text_dir=None) -> list[int]:
    """The first ``n_tokens`` token ids of the essays (the text repeated when it is too short)."""
    text = essay_text(text_dir)
    # tokenising a generous prefix is enough (and much faster than the whole 644 KB); the margin
    # keeps the cut, where the last pre-token may differ, outside the returned ids
    ids = tokenizer(text[: 8 * n_tokens + 1000], add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < n_tokens + 16:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if not ids:
        raise ValueError("the essay text tokenised to nothing")
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]


def splice_at_depth(tokenizer, haystack: list[int], needle: str, depth: float,
                    period_ids: set[int]) -> tuple[str, int]:
    """Insert ``needle`` (text) after the full stop at or before token ``int(len * depth)``.

    Returns the decoded text and the token index of the insertion point in ``haystack``. Depth 1.0
    appends the needle (the NIAH convention).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    position = len(haystack) if depth >= 1.0 else snap_to_period(haystack, int(len(haystack) * depth),
                                                                  period_ids)
    needle_ids = tokenizer(needle, add_special_tokens=False, verbose=False)["input_ids"]
    text = tokenizer.decode(haystack[:position] + needle_ids + haystack[position:])
    return text, position


def load(data_dir=None, tasks: Sequence[str] | str | None = None, tokenizer=None,
         max_prompt_tokens: int | None = None, limit: int | None = None, chat_template: bool | None = None,
         problems=None, *, lengths: Sequence[int] = DEFAULT_LENGTHS,
         depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = 3, seed: int = DEFAULT_SEED,
         text_dir=None, max_new_tokens: int = 10, sequential: int = 0) -> Iterator[Sample]:
    """Pass key samples for every (length, depth, key); ``samples`` = keys per depth.

    ``sequential=N``: instead, ``samples`` samples per length, each with N named keys asked in turn
    (module docstring); ``depths`` is then unused.

    ``data_dir``, ``max_prompt_tokens`` and ``problems`` are accepted for the registry signature
    and unused: prompts are generated at the requested lengths.
    """
    resolve_tasks(tasks, TASKS, TASKS, "passkey")
    if tokenizer is None:
        raise ValueError("passkey needs a tokenizer (haystack lengths are counted in tokens)")
    if samples < 1 or any(n < 1 for n in lengths):
        raise ValueError(f"samples and lengths must be >= 1, got samples={samples}, lengths={list(lengths)}")
    if sequential:
        yield from _sequential(tokenizer, lengths, sequential, samples, seed, text_dir, max_new_tokens, limit,
                               chat_template)
        return
    period_ids = period_token_ids(tokenizer)
    all_tokens = essay_tokens(tokenizer, max(lengths), text_dir)
    count = 0
    for length in lengths:
        haystack = all_tokens[:length]
        for depth in depths:
            for index in range(samples):
                key = str(random.Random(f"{seed}:{depth:g}:{index}").randint(10000, 99999))
                if limit is not None and count >= limit:
                    return
                needle = " " + PASS_KEY_SENTENCE.format(key=key)
                context, position = splice_at_depth(tokenizer, haystack, needle, depth, period_ids)
                count += 1
                yield Sample(
                    task="passkey", sample_id=f"len{length}-depth{depth:g}-key{index}",
                    context=context, question="\n\n" + QUESTION, answer_prefix="", gold=[key],
                    metric="string_match_part", max_new_tokens=max_new_tokens,
                    chat=True if chat_template is None else chat_template,
                    extra={"length": length, "depth": depth, "insert_token": position},
                )


def _sequential(tokenizer, lengths, n_keys: int, samples: int, seed: int, text_dir, max_new_tokens: int,
                limit: int | None, chat_template: bool | None) -> Iterator[Sample]:
    if not 2 <= n_keys <= len(ORDINALS):
        raise ValueError(f"sequential={n_keys} must be between 2 and {len(ORDINALS)} (questions per sample)")
    period_ids = period_token_ids(tokenizer)
    all_tokens = essay_tokens(tokenizer, max(lengths), text_dir)
    count = 0
    for length in lengths:
        for index in range(samples):
            if limit is not None and count >= limit:
                return
            rng = random.Random(f"{seed}:sequential{n_keys}:{index}")
            keys = [str(rng.randint(10000, 99999)) for _ in range(n_keys)]
            order = list(range(n_keys))
            rng.shuffle(order)  # questions are not asked in the order the keys appear
            haystack = all_tokens[:length]
            # insert from the deepest needle up, so earlier insertion points stay valid token indices
            inserted = []
            for i in reversed(range(n_keys)):
                depth = (i + 0.5) / n_keys
                needle = " " + NAMED_SENTENCE.format(name=ORDINALS[i], key=keys[i])
                position = snap_to_period(haystack, int(length * depth), period_ids)
                needle_ids = tokenizer(needle, add_special_tokens=False, verbose=False)["input_ids"]
                haystack = haystack[:position] + needle_ids + haystack[position:]
                inserted.append(position)
            questions = [("\n\n" if turn == 0 else "") + NAMED_QUESTION.format(name=ORDINALS[i])
                         for turn, i in enumerate(order)]
            count += 1
            yield Sample(
                task="passkey", sample_id=f"len{length}-seq{n_keys}-key{index}",
                context=tokenizer.decode(haystack), question=questions[0], answer_prefix="",
                gold=[keys[order[0]]], metric="string_match_part", max_new_tokens=max_new_tokens,
                chat=True if chat_template is None else chat_template,
                extra={"length": length, "sequential": n_keys,
                       "turns": [{"question": q, "gold": [keys[i]]} for q, i in zip(questions[1:], order[1:])]},
            )
