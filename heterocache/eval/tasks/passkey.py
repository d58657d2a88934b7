"""Pass key retrieval in the Paul Graham essays.

Single key (the default) follows the "Passkey protocol" of PEERS.md exactly:

* essay text: the essays in sorted file-name order joined with ``"\\n\\n"``; haystack =
  ``tokenizer.decode(ids[:length])`` where ``ids`` tokenises that text with ``add_special_tokens=False``;
* keys: ``rng = random.Random(seed)`` (seed 7), then ``rng.randrange(10000, 99999)`` drawn in a row,
  ``samples`` keys per depth, all of the first depth's keys first; drawn once, so every length
  gets the same keys (with the defaults: 3 keys at each of the depths 0.1, 0.5, 0.9);
* needle ``" The pass key is K. Remember it. K is the pass key. "`` (leading and trailing space)
  inserted into the haystack TEXT at ``text.rfind(". ", 0, int(len(text) * depth)) + 1``, i.e. right
  after the full stop of the last ". " that ends before the depth's character cut (at 0 when there is
  none; depth 1.0 appends); ``extra["insert_char"]`` is that index;
* user turn = ``context + question`` with context = the haystack with the needle and question =
  ``"\\n\\nWhat is the pass key? Answer with the number only."`` (kept apart so the question can be
  asked after compression); chat template with generation prompt; greedy, 12 new tokens;
* a hit when the first number (maximal digit run) of the answer is K (metric ``first_int_match``).

``sequential=N`` (N >= 2, "compress once, ask many"; unchanged since its results were measured):
each sample hides N differently named keys ("The first pass key is K. ...") at depths ``(i + 0.5) / N``,
spliced at the token level after the full-stop token at or before token ``int(length * depth)`` of the
essays joined without separator, and asks for them one after the other, each question (a new user
turn) answered before the next is asked; keys from ``random.Random(f"{seed}:sequential{N}:{index}")``
(seed 1234); 12 new tokens per answer (a named answer is 11); a hit when the key appears in the
answer (``string_match_part``); the runner scores the fraction of questions answered (``extra["turns"]`` holds the follow-up questions
and their keys).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from heterocache.eval.tasks.base import Sample
from heterocache.eval.tasks.common import resolve_tasks
from heterocache.eval.tasks.essays import PEERS_SEPARATOR, essay_text, period_token_ids, snap_to_period

TASKS = ("passkey",)
PASS_KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
DEFAULT_LENGTHS = (3000,)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
DEFAULT_SEED = 7
DEFAULT_MAX_NEW_TOKENS = 12  # both modes: a named answer ("The second pass key is 80784.") is 11 tokens
SEQUENTIAL_SEED = 1234
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
NAMED_SENTENCE = "The {name} pass key is {key}. Remember it. {key} is the {name} pass key."
NAMED_QUESTION = "What is the {name} pass key? Answer with the number only."


def essay_tokens(tokenizer, n_tokens: int, text_dir=None, separator: str = "") -> list[int]:
    """The first ``n_tokens`` token ids of the essays joined with ``separator`` (repeated when too short)."""
    text = essay_text(text_dir, separator=separator)
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
    """Insert ``needle`` (text) after the full-stop token at or before token ``int(len * depth)``.

    Token-level splice of the NIAH haystacks (and of ``sequential``). Returns the decoded text and
    the token index of the insertion point in ``haystack``. Depth 1.0 appends the needle.
    """
    _check_depth(depth)
    position = len(haystack) if depth >= 1.0 else snap_to_period(haystack, int(len(haystack) * depth),
                                                                  period_ids)
    needle_ids = tokenizer(needle, add_special_tokens=False, verbose=False)["input_ids"]
    text = tokenizer.decode(haystack[:position] + needle_ids + haystack[position:])
    return text, position


def insert_at_depth(text: str, needle: str, depth: float) -> tuple[str, int]:
    """Insert ``needle`` into ``text`` right after the last ". " that ends before ``int(len(text) * depth)``.

    The insertion index is ``text.rfind(". ", 0, cut) + 1`` (just after the full stop, so the space
    of the ". " follows the needle); 0 when there is no ". " before the cut; depth 1.0 appends.
    Returns the new text and the insertion index (a character index into ``text``).
    """
    _check_depth(depth)
    index = len(text) if depth >= 1.0 else text.rfind(". ", 0, int(len(text) * depth)) + 1
    return text[:index] + needle + text[index:], index


def draw_keys(seed: int, n_depths: int, per_depth: int) -> list[list[str]]:
    """``per_depth`` keys for each of ``n_depths`` depths: ``randrange(10000, 99999)`` in a row
    from ``random.Random(seed)``, the first depth's keys first."""
    rng = random.Random(seed)
    return [[str(rng.randrange(10000, 99999)) for _ in range(per_depth)] for _ in range(n_depths)]


def _check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")


def load(data_dir=None, tasks: Sequence[str] | str | None = None, tokenizer=None,
         max_prompt_tokens: int | None = None, limit: int | None = None, chat_template: bool | None = None,
         problems=None, *, lengths: Sequence[int] = DEFAULT_LENGTHS,
         depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = 3, seed: int | None = None,
         text_dir=None, max_new_tokens: int | None = None, sequential: int = 0) -> Iterator[Sample]:
    """Pass key samples for every (length, depth, key) in that order; ``samples`` = keys per depth.

    ``seed`` defaults to 7 (single key, PEERS.md) or 1234 (``sequential``); ``max_new_tokens`` to 12.
    ``sequential=N``: instead, ``samples`` samples per length, each with N named keys asked in
    turn (module docstring); ``depths`` is then unused.

    ``data_dir``, ``max_prompt_tokens`` and ``problems`` are accepted for the registry signature
    and unused: prompts are generated at the requested lengths.
    """
    resolve_tasks(tasks, TASKS, TASKS, "passkey")
    if tokenizer is None:
        raise ValueError("passkey needs a tokenizer (haystack lengths are counted in tokens)")
    if samples < 1 or not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"samples and lengths must be >= 1, got samples={samples}, lengths={list(lengths)}")
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if seed is None:
        seed = SEQUENTIAL_SEED if sequential else DEFAULT_SEED
    if sequential:
        yield from _sequential(tokenizer, lengths, sequential, samples, seed, text_dir, max_new_tokens, limit,
                               chat_template)
        return
    if not depths:
        raise ValueError("depths must name at least one depth in [0, 1]")
    for depth in depths:
        _check_depth(depth)
    keys = draw_keys(seed, len(depths), samples)
    all_tokens = essay_tokens(tokenizer, max(lengths), text_dir, separator=PEERS_SEPARATOR)
    count = 0
    for length in lengths:
        haystack = tokenizer.decode(all_tokens[:length])
        for depth, depth_keys in zip(depths, keys):
            for index, key in enumerate(depth_keys):
                if limit is not None and count >= limit:
                    return
                needle = " " + PASS_KEY_SENTENCE.format(key=key) + " "
                context, position = insert_at_depth(haystack, needle, depth)
                count += 1
                yield Sample(
                    task="passkey", sample_id=f"len{length}-depth{depth:g}-key{index}",
                    context=context, question="\n\n" + QUESTION, answer_prefix="", gold=[key],
                    metric="first_int_match", max_new_tokens=max_new_tokens,
                    chat=True if chat_template is None else chat_template,
                    extra={"length": length, "depth": depth, "insert_char": position},
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
