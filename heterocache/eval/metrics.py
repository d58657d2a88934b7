"""Official metric definitions for LongBench, LongBench v2, InfiniteBench and RULER (spec/benchmarks.md).

Every metric has the signature ``fn(prediction, gold, sample=None, strict_official=True) -> float``
where ``gold`` is the sample's list of acceptable answers and ``sample`` (a ``Sample`` or a dict)
supplies task-specific fields such as ``all_classes``. Each metric combines the gold list the way
its benchmark does (most take the max over gold answers). Per-sample scores are stored in [0, 1];
the aggregation helpers at the bottom report them x100. ``strict_official=True`` reproduces the
official quirks (classification list mutation, Math.Calc sign loss); ``False`` fixes them.
"""

from __future__ import annotations

import difflib
import functools
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from statistics import mean
from typing import Any

ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛"
    "〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCT = frozenset(string.punctuation)
_ZH_PUNCT = frozenset(string.punctuation + ZH_PUNCTUATION)
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def _field(sample: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a Sample's ``extra`` or from a dict (top level, then its ``extra``)."""
    if sample is None:
        return default
    if isinstance(sample, Mapping):
        if key in sample:
            return sample[key]
        extra = sample.get("extra")
        return extra.get(key, default) if isinstance(extra, Mapping) else default
    return getattr(sample, "extra", {}).get(key, default)


# ---------------------------------------------------------------- normalisation and F1
def normalize_en(text: str) -> str:
    """Lowercase, drop ASCII punctuation, replace whole-word a/an/the by a space, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def normalize_zh(text: str) -> str:
    """Lowercase, drop ASCII and CJK punctuation, delete all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCT).split())


def token_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


@functools.cache
def _jieba():
    import jieba

    jieba.setLogLevel(60)  # silence the "Building prefix dict" banner
    return jieba


def _cut_zh(text: str) -> list[str]:
    return list(_jieba().cut(text, cut_all=False))


def qa_f1(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    pred = normalize_en(prediction).split()
    return max(token_f1(pred, normalize_en(str(g)).split()) for g in gold)


def qa_f1_zh(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    """LongBench: jieba words, each normalised, empties dropped."""

    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh(t) for t in _cut_zh(text)) if w]

    pred = words(prediction)
    return max(token_f1(pred, words(g)) for g in gold)


def qa_f1_zh_char(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    """InfiniteBench Zh.QA: one token per character after ``normalize_zh``."""
    pred = list(normalize_zh(prediction))
    return max(token_f1(pred, list(normalize_zh(str(g)))) for g in gold)


# ---------------------------------------------------------------- ROUGE
def _rouge_l_one(prediction: str, gold: str) -> float:
    from rouge import Rouge  # PyPI rouge 1.0.1, as the official LongBench scorer

    try:
        return float(Rouge().get_scores([prediction], [gold], avg=True)["rouge-l"]["f"])
    except Exception:  # the official scorer maps every failure (e.g. empty hypothesis) to 0
        return 0.0


def rouge_l(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    return max(_rouge_l_one(prediction, g) for g in gold)


def rouge_zh(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    pred = " ".join(_cut_zh(prediction))
    return max(_rouge_l_one(pred, " ".join(_cut_zh(g))) for g in gold)


def rouge_lsum(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    """InfiniteBench En.Sum: rouge-score ROUGE-Lsum F (default tokenizer, no stemmer, newline sentences)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)
    return max(scorer.score(str(g), prediction)["rougeLsum"].fmeasure for g in gold)


# ---------------------------------------------------------------- LongBench classification / synthetic / code
def classification(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    classes = _field(sample, "all_classes")
    if not classes:
        raise ValueError("metric 'classification' needs the sample's 'all_classes' list")
    return max(_classification_one(prediction, g, classes, strict_official) for g in gold)


def _classification_one(prediction: str, gold: str, classes: list[str], strict_official: bool) -> float:
    matched = [c for c in classes if c in prediction]
    if strict_official:
        # The official loop removes items from the list it iterates, so the element right after
        # each removed one is never examined; reproduced to match published numbers.
        i = 0
        while i < len(matched):
            if matched[i] in gold and matched[i] != gold:
                del matched[i]
            i += 1
    else:
        matched = [c for c in matched if not (c in gold and c != gold)]
    return 1.0 / len(matched) if gold in matched else 0.0


def _number_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    return max(_number_share(prediction, re.findall(r"Paragraph (\d+)", g)[0]) for g in gold)


def retrieval_zh(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    return max(_number_share(prediction, re.findall(r"段落(\d+)", g)[0]) for g in gold)


def count(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    return max(_number_share(prediction, str(g)) for g in gold)


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy ``fuzz.ratio`` without python-Levenshtein: rounded difflib ratio x100."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return round(100 * difflib.SequenceMatcher(None, a, b).ratio())


def code_sim(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    lines = prediction.lstrip("\n").split("\n")
    line = next((s for s in lines if "`" not in s and "#" not in s and "//" not in s), "")
    return max(fuzz_ratio(line, g) / 100 for g in gold)


def exact_match(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    return float(any(prediction.strip() == str(g).strip() for g in gold))


# ---------------------------------------------------------------- InfiniteBench
def _first_digit_run(text: str) -> str:
    return next((run for run in re.split(r"[^0-9]", text) if run), "")


def _spaced_words(text: str, chars: Sequence[str]) -> list[str]:
    for ch in chars:
        text = text.replace(ch, " ")
    return text.split()


def _squeeze(text: str) -> str:
    while "  " in text:
        text = text.replace("  ", " ")
    return text


_KV_CHARS = ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]


def _typed_label(gold: list[str], sample: Any, strict_official: bool) -> Any:
    """The label with its file type (int/float) when the sample carries the raw answer.

    ``Sample.gold`` holds strings, so without the raw answer the string is coerced to a number
    (spec pitfall 3). A raw string label in strict mode stays a string, as in the official code.
    """
    raw = _field(sample, "answer")
    if isinstance(raw, list) and raw:
        raw = raw[0]
    if raw is not None and (strict_official or not isinstance(raw, str)):
        return raw
    text = str(gold[0]).strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else float(text)


def first_int_match(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    """The first digit run (maximal run of 0-9) equals the label: InfiniteBench Retrieve.PassKey /
    Retrieve.Number, and the single-key passkey task (PEERS.md: "12345678" misses the key 12345)."""
    return float(_first_digit_run(prediction) == str(gold[0]))


def kv_match(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    return float(str(gold[0]) in _spaced_words(prediction, _KV_CHARS))


def ib_dialogue(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    label = gold[0] if strict_official else gold[0].upper()
    return float(label in [w.upper() for w in _spaced_words(prediction, _KV_CHARS)])


def ib_choice(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    """En.MC; ``gold`` = [answer text, letter]."""
    pred = prediction.strip()
    if not pred:
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in gold)
    if pred in gold:
        return 1.0
    for old in ["\n", '"', "'", ".", ",", "?", "!", "{", "}"]:
        pred = pred.replace(old, " ")
    pred = _squeeze(pred)
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = pred.find(prefix)
        if idx != -1:
            rest = pred[idx + len(prefix) + 1 :]
            return float(bool(rest) and any(rest.startswith(s) for s in gold))
    word = next((w for w in pred.split() if w in "ABCD"), None)  # substring test, as official
    return float(word is not None and word in gold)


def ib_code_debug(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    """Code.Debug; ``gold`` = [function name, letter]."""
    fn_name, letter = gold[0], gold[1]
    pred = prediction.strip()
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    for old in ["\n", "`", "'", '"', "-", "*", "Option", "option"]:
        pred = pred.replace(old, " ")
    pred = _squeeze(pred)
    for prefix in ("answer is:", "is:", "answer:", "correct option is:"):
        idx = pred.find(prefix)
        if idx != -1:
            rest = pred[idx + len(prefix) + 1 :]
            return float(bool(rest) and (rest.startswith(letter) or rest.startswith(fn_name)))
    return 0.0


def ib_code_run(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    words = _spaced_words(prediction.strip(), ["\n", ".", "`", "'", '"', ":"])
    try:
        return float(bool(words) and int(words[-1]) == _typed_label(gold, sample, strict_official))
    except ValueError:
        return 0.0


def ib_math_find(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    label = _typed_label(gold, sample, strict_official=False)
    match = re.search(r"\d+\.\d+|\d+", prediction)
    if match is None:
        return 0.0
    try:  # an int label against "3.5" crashes the official scorer; scored 0 here
        return float((int if isinstance(label, int) else float)(match.group(0)) == label)
    except ValueError:
        return 0.0


def ib_math_calc(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    """Length of the matching prefix of numbers / len(label). Strict mode loses signs, as official."""
    raw = _field(sample, "answer")
    if isinstance(raw, list) and raw and isinstance(raw[0], list):
        raw = raw[0]
    if isinstance(raw, list):
        label = [int(x) for x in raw]
    else:
        label = [int(x) for x in re.findall(r"-?\d+", gold[0])]
    pattern = r"\d+" if strict_official else r"-?\d+"
    pred = [int(x) for x in re.findall(pattern, prediction)]
    hits = 0
    for want, got in zip(label, pred):
        if want != got:
            break
        hits += 1
    return hits / len(label) if label else 0.0


# ---------------------------------------------------------------- LongBench v2 and RULER
_V2_EXPLICIT = (r"The correct answer is \(([A-D])\)", r"The correct answer is ([A-D])")
_V2_FALLBACKS = (r"\{([A-D])\}", r"\(([A-D])\)", r"\b([A-D])\b")


def extract_choice_v2(response: str, lenient: bool = False) -> str | None:
    """LongBench v2 answer letter. ``lenient`` adds the official-HeteroCache fallbacks ({X}, (X),
    any standalone A-D), tried only after the explicit format: they inflate scores (article "A")."""
    response = response.replace("*", "")
    for pattern in _V2_EXPLICIT + (_V2_FALLBACKS if lenient else ()):
        match = re.search(pattern, response)
        if match:
            return match.group(1)
    return None


def choice_v2(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    return float(extract_choice_v2(prediction) == gold[0].strip())


def choice_v2_lenient(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    return float(extract_choice_v2(prediction, lenient=True) == gold[0].strip())


def choice_v2_compensated(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    """Unparseable answers score 0.25 (chance) instead of 0."""
    letter = extract_choice_v2(prediction)
    return 0.25 if letter is None else float(letter == gold[0].strip())


def _ruler_clean(prediction: str) -> str:
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip().lower()


def string_match_all(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    pred = _ruler_clean(prediction)
    return sum(str(g).lower() in pred for g in gold) / len(gold)


def string_match_part(prediction: str, gold: list[str], sample=None, strict_official=True) -> float:
    pred = _ruler_clean(prediction)
    return float(any(str(g).lower() in pred for g in gold))


Metric = Callable[..., float]
METRICS: dict[str, Metric] = {fn.__name__: fn for fn in (
    qa_f1, qa_f1_zh, qa_f1_zh_char, rouge_l, rouge_zh, rouge_lsum, classification, retrieval,
    retrieval_zh, count, code_sim, exact_match, first_int_match, kv_match, ib_dialogue, ib_choice,
    ib_code_debug, ib_code_run, ib_math_find, ib_math_calc, choice_v2, choice_v2_lenient,
    choice_v2_compensated, string_match_all, string_match_part,
)}


def postprocess(prediction: str, sample: Any = None) -> str:
    """LongBench keeps only the first line for trec / triviaqa / samsum / lsht (and their _e)."""
    task = getattr(sample, "task", None) or _field(sample, "task") or _field(sample, "dataset") or ""
    if task.removesuffix("_e") in FIRST_LINE_TASKS:
        return prediction.lstrip("\n").split("\n")[0]
    return prediction


def score(metric_name: str, prediction: str, gold: list[str] | str, sample: Any = None,
          *, strict_official: bool = True) -> float:
    """Score one prediction in [0, 1] after the task's post-processing."""
    if metric_name not in METRICS:
        raise ValueError(f"unknown metric {metric_name!r}; valid metrics: {', '.join(sorted(METRICS))}")
    gold = [gold] if isinstance(gold, str) else list(gold)
    if not gold:
        raise ValueError("gold must hold at least one answer")
    fn = METRICS[metric_name]
    return float(fn(postprocess(prediction, sample), gold, sample, strict_official=strict_official))


# ---------------------------------------------------------------- aggregation (reported x100)
def task_score(scores: Sequence[float]) -> float:
    """LongBench / InfiniteBench task score: ``round(100 * mean, 2)``."""
    if not scores:
        raise ValueError("task_score needs at least one sample score")
    return round(100 * mean(scores), 2)


def longbench_e_buckets(scores: Sequence[float], lengths: Sequence[int]) -> dict[str, float | None]:
    """Per-bucket task score by the record's ``length`` (words or characters); None if empty."""
    buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for value, length in zip(scores, lengths, strict=True):
        key = "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"
        buckets[key].append(value)
    return {k: round(100 * mean(v), 2) if v else None for k, v in buckets.items()}


def longbench_v2_breakdown(scores: Sequence[float], difficulties: Sequence[str],
                           lengths: Sequence[str]) -> dict[str, float | None]:
    """Accuracy x100 (1 decimal) overall, per difficulty (easy/hard) and length (short/medium/long)."""
    groups: dict[str, list[float]] = {k: [] for k in ("overall", "easy", "hard", "short", "medium", "long")}
    for value, difficulty, length in zip(scores, difficulties, lengths, strict=True):
        for key in ("overall", difficulty, length):
            groups.setdefault(key, []).append(value)
    return {k: round(100 * mean(v), 1) if v else None for k, v in groups.items()}


def average(task_scores: Mapping[str, float], categories: Mapping[str, str] | None = None) -> float:
    """Unweighted mean over tasks, or (with ``categories``: task -> category) the mean of category means."""
    if not task_scores:
        raise ValueError("average needs at least one task score")
    if categories is None:
        return round(mean(task_scores.values()), 2)
    by_category: dict[str, list[float]] = {}
    for task, value in task_scores.items():
        by_category.setdefault(categories[task], []).append(value)
    return round(mean(mean(v) for v in by_category.values()), 2)
