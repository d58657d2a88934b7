"""RULER-style synthetic tasks, generated deterministically (spec/benchmarks.md section 4).

Each sample draws from its own ``random.Random(f"{seed}:{task}:{length}:{index}")``, so a sample does
not depend on ``limit`` or on which other tasks run. The haystack size is the largest that keeps
``tokens(prompt incl. chat template) + max_new_tokens <= length`` (binary search on the first
sample of a task, then shrunk per sample if needed; RULER searches in coarser steps).

Offline substitutes (documented deviations): sentences are split by a regex instead of NLTK punkt;
``words`` keys and the cwe word pool come from the essays' vocabulary (lower-case words of 3-10
letters) instead of the ``wonderwords`` lists. Metric: ``string_match_all`` (eval/metrics.py).
"""

from __future__ import annotations

import functools
import random
import re
import string
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from heterocache.eval.search import largest_fitting
from heterocache.eval.tasks.base import Sample, encode_prompt
from heterocache.eval.tasks.common import resolve_tasks
from heterocache.eval.tasks.essays import essay_text, split_sentences

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type} for {key} is: {value}."
DEPTH_GRID = tuple(round(i * 100 / 39) for i in range(40))  # round(linspace(0, 100, 40))


@dataclass(frozen=True)
class NiahConfig:
    haystack: str  # noise | essay | needle
    key_type: str  # words | numbers | uuids
    value_type: str
    n_keys: int = 1
    n_values: int = 1
    n_queries: int = 1


NIAH_TASKS = {
    "niah_single_1": NiahConfig("noise", "words", "numbers"),
    "niah_single_2": NiahConfig("essay", "words", "numbers"),
    "niah_single_3": NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", n_keys=4),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers"),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids"),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", n_values=4),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", n_keys=4, n_queries=4),
}
MAX_NEW_TOKENS = {**dict.fromkeys(NIAH_TASKS, 128), "vt": 30, "cwe": 120, "fwe": 50}
TASKS = tuple(MAX_NEW_TOKENS)


@functools.cache
def _essay_words(text_dir=None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(all whitespace words of the essays, sorted unique lower-case words of 3-10 letters)."""
    text = essay_text(text_dir)
    return tuple(text.split()), tuple(sorted(set(re.findall(r"\b[a-z]{3,10}\b", text.lower()))))


def _draw(rng: random.Random, kind: str, vocabulary: Sequence[str]) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "plain":  # fwe's coded words
        return "".join(rng.choices(string.ascii_lowercase, k=6))
    return f"{rng.choice(vocabulary)}-{rng.choice(vocabulary)}"


def _unique(rng: random.Random, kind: str, vocabulary: Sequence[str], n: int, avoid=()) -> list[str]:
    out: list[str] = []
    seen = set(avoid)
    while len(out) < n:
        item = _draw(rng, kind, vocabulary)
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _insert_lines(rng: random.Random, filler: list[str], inserted: list[str]) -> list[str]:
    """Place ``inserted`` (in order) at random distinct slots among ``filler``."""
    total = len(filler) + len(inserted)
    slots = set(rng.sample(range(total), len(inserted)))
    pieces, filler_it, inserted_it = [], iter(filler), iter(inserted)
    for slot in range(total):
        pieces.append(next(inserted_it) if slot in slots else next(filler_it))
    return pieces


def _niah(rng: random.Random, size: int, cfg: NiahConfig, words, vocabulary) -> tuple[str, str, str, list[str]]:
    keys = _unique(rng, cfg.key_type, vocabulary, cfg.n_keys)
    values = [_unique(rng, cfg.value_type, vocabulary, cfg.n_values) for _ in keys]
    needles = [NEEDLE.format(type=cfg.value_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    if cfg.haystack == "essay":
        sentences = split_sentences(" ".join((words * (size // max(len(words), 1) + 1))[:size]))
        cuts = sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTH_GRID, len(needles)))
        pieces, start = [], 0
        for cut, needle in zip(cuts, needles):
            pieces += sentences[start:cut] + [needle]
            start = cut
        context = " ".join(pieces + sentences[start:])
    else:
        filler = [NOISE] * size
        if cfg.haystack == "needle":
            distractor_keys = _unique(rng, cfg.key_type, vocabulary, size, avoid=keys)
            distractor_values = _unique(rng, cfg.value_type, vocabulary, size, avoid=sum(values, []))
            filler = [NEEDLE.format(type=cfg.value_type, key=k, value=v)
                      for k, v in zip(distractor_keys, distractor_values)]
        context = "\n".join(_insert_lines(rng, filler, needles))
    queried = rng.sample(range(len(keys)), cfg.n_queries)
    names = [keys[i] for i in queried]
    query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
    kind = cfg.value_type
    intro = ("Some special magic {t} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {t} afterwards.\n")
    question = "What are all the special magic {t} for {q} mentioned in the provided text?"
    prefix = " The special magic {t} for {q} mentioned in the provided text are"
    if cfg.n_queries * cfg.n_values == 1:  # RULER singularises the template text, not the context
        intro, question, prefix = (s.replace("Some", "A").replace("are all", "is").replace("are", "is")
                                   for s in (intro, question, prefix))
        kind = kind[:-1]
    gold = [v for i in queried for v in values[i]]
    return (intro.format(t=kind) + context + "\n", question.format(t=kind, q=query),
            prefix.format(t=kind, q=query), gold)


def _vt_chain(rng: random.Random, noise_lines: int, hops: int, name_length: int) -> tuple[str, str, list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]} " for i in range(hops)]
    return "\n".join(_insert_lines(rng, [NOISE] * noise_lines, chain)), value, names


def _vt_prompt(body: str, value: str, hops: int) -> tuple[str, str, str]:
    return ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            + body + "\n",
            f"Question: Find all variables that are assigned the value {value} in the text above.",
            f" Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
            f"variables are assigned the value {value}, they are: ")


def _vt(rng: random.Random, size: int, length: int, hops: int = 4) -> tuple[str, str, str, list[str]]:
    example_body, example_value, example_names = _vt_chain(rng, 20 if length >= 4096 else 3, hops, 3)
    example = "".join(_vt_prompt(example_body, example_value, hops)) + " ".join(example_names)
    body, value, names = _vt_chain(rng, size, hops, 5)
    context, question, prefix = _vt_prompt(body, value, hops)
    return example + "\n\n" + context, question, prefix, names


def _numbered(items: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))


def _cwe_list(rng: random.Random, pool: Sequence[str], n_words: int, common_freq: int,
              rare_freq: int) -> tuple[str, list[str]]:
    chosen = rng.sample(pool, n_words)
    common, rare = chosen[:10], chosen[10:]
    items = common * common_freq + rare * rare_freq
    rng.shuffle(items)
    return _numbered(items), common


def _cwe(rng: random.Random, size: int, length: int, pool) -> tuple[str, str, str, list[str]]:
    intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
    question = "Question: What are the 10 most common words in the above list?"
    prefix = " Answer: The top 10 words that appear most often in the list are:"
    small = length < 4096
    example, example_common = _cwe_list(rng, pool, 20 if small else 40, 3 if small else 10, 1 if small else 3)
    example_text = intro + example + "\n" + question + prefix + " " + _numbered(example_common)
    body, common = _cwe_list(rng, pool, 10 + size, 6 if small else 30, 1 if small else 3)
    return example_text + "\n\n" + intro + body + "\n", question, prefix, common


def _fwe(rng: random.Random, size: int, length: int, alpha: float = 2.0) -> tuple[str, str, str, list[str]]:
    vocabulary = _unique(rng, "plain", (), max(length // 50, 8))
    vocabulary[0] = "..."
    words = [w for rank, w in enumerate(vocabulary, 1) for _ in range(int(size * rank ** -alpha / _zeta(alpha)))]
    rng.shuffle(words)
    intro = ("Read the following coded text and track the frequency of each coded word. Find the three "
             "most frequently appeared coded words. ")
    question = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                "most frequently appeared words in the above coded text?")
    prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"
    return intro + " ".join(words) + "\n", question, prefix, vocabulary[1:4]


@functools.cache
def _zeta(alpha: float) -> float:
    return sum(k ** -alpha for k in range(1, 100_000))


def _generator(task: str, length: int, text_dir) -> tuple[Callable, int]:
    """(generate(rng, size) -> (context, question, prefix, gold), smallest useful size)."""
    if task in NIAH_TASKS:
        cfg = NIAH_TASKS[task]
        words, vocabulary = _essay_words(text_dir)
        return (lambda rng, size: _niah(rng, size, cfg, words, vocabulary)), 1
    if task == "vt":
        return (lambda rng, size: _vt(rng, size, length)), 1
    if task == "cwe":
        pool = _essay_words(text_dir)[1]
        return (lambda rng, size: _cwe(rng, size, length, pool)), 1
    return (lambda rng, size: _fwe(rng, size, length)), 200  # ranks 2-4 need distinct counts


def load(data_dir=None, tasks: Sequence[str] | str | None = None, tokenizer=None,
         max_prompt_tokens: int | None = None, limit: int | None = None, chat_template: bool | None = None,
         problems=None, *, lengths: Sequence[int] = (4096,), samples: int = 50, seed: int = 42,
         text_dir=None) -> Iterator[Sample]:
    """``samples`` samples per task and length; ``limit`` caps the samples per task and length."""
    names = resolve_tasks(tasks, TASKS, TASKS, "ruler")
    if tokenizer is None:
        raise ValueError("ruler needs a tokenizer (sample sizes are fitted in tokens)")
    chat = True if chat_template is None else chat_template
    for task in names:
        for length in lengths:
            generate, smallest = _generator(task, length, text_dir)

            def build(index: int, size: int, task=task, length=length, generate=generate) -> Sample:
                rng = random.Random(f"{seed}:{task}:{length}:{index}")
                context, question, prefix, gold = generate(rng, size)
                return Sample(task=task, sample_id=f"len{length}-{index}", context=context, question=question,
                              answer_prefix=prefix, gold=gold, metric="string_match_all",
                              max_new_tokens=MAX_NEW_TOKENS[task], chat=chat,
                              extra={"length": length, "size": size, "answer_after_template": True})

            def fits(sample: Sample, length=length) -> bool:
                context_ids, rest_ids = encode_prompt(tokenizer, sample)
                return len(context_ids) + len(rest_ids) + sample.max_new_tokens <= length

            size = largest_fitting(lambda n: fits(build(0, n)), low=smallest)  # noqa: B023
            if size < smallest:
                raise ValueError(f"ruler {task}: length {length} is too short for even the smallest sample")
            for index in range(samples if limit is None else min(samples, limit)):
                sample, shrunk = build(index, size), size
                while not fits(sample) and shrunk > smallest:
                    shrunk = max(smallest, int(shrunk * 0.98))
                    sample = build(index, shrunk)
                yield sample
