"""Synthetic generators (passkey, NIAH, RULER): determinism, placement, budgets, answers, metrics."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from eval_helpers import tiny_tokenizer

from heterocache.eval import metrics
from heterocache.eval.metrics import string_match_all, string_match_part
from heterocache.eval.runner import score_prediction
from heterocache.eval.tasks import essays, niah, passkey, ruler
from heterocache.eval.tasks.base import Sample, encode_prompt
from heterocache.eval.tasks.essays import period_token_ids


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _assert_at_depth(tok, context: str, needle: str, depth: float, haystack_len: int, insert: int):
    """The needle sits, once, right after the last full stop at or before token int(len * depth)."""
    assert context.count(needle) == 1
    ids = _ids(tok, context)
    needle_ids = _ids(tok, needle)
    start = len(_ids(tok, context[: context.index(needle)]))
    assert ids[start: start + len(needle_ids)] == needle_ids
    assert start == insert
    if depth >= 1.0:
        assert start == haystack_len  # appended
        return
    target = int(haystack_len * depth)
    haystack = ids[:start] + ids[start + len(needle_ids):]
    assert start <= target
    periods = period_token_ids(tok)
    assert start == 0 or haystack[start - 1] in periods
    assert not periods & set(haystack[start:target])  # no closer full stop was skipped


PEERS_QUESTION = "\n\nWhat is the pass key? Answer with the number only."


def _needle(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


def _peers_keys(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [str(rng.randrange(10000, 99999)) for _ in range(n)]


@pytest.fixture()
def two_essays(tmp_path):
    """Two tiny essays; read in file-name order and joined with a blank line they give
    ``"Aa bb. Cc dd. Ee ff.\n\nGg hh. Ii jj."`` (35 characters, one byte token each)."""
    (tmp_path / "b.txt").write_text("Gg hh. Ii jj.")
    (tmp_path / "a.txt").write_text("Aa bb. Cc dd. Ee ff.")
    return tmp_path


def test_passkey_peers_protocol_by_hand(tok, two_essays):
    samples = list(passkey.load(tokenizer=tok, lengths=[35], depths=[0.1, 0.5, 0.9, 1.0], samples=1,
                                text_dir=two_essays))
    k1, k2, k3, k4 = (s.gold[0] for s in samples)
    assert [k1, k2, k3, k4] == _peers_keys(4)
    # depth 0.1: cut 3, no ". " before it -> the needle opens the text
    # depth 0.5: cut 17 ("Aa bb. Cc dd. Ee |"): after the full stop of "dd. " (index 13)
    # depth 0.9: cut 31 ("... Gg hh. Ii|"): after "hh." (index 28); ".\n\n" is no ". "
    # depth 1.0: appended
    assert [s.context for s in samples] == [
        _needle(k1) + "Aa bb. Cc dd. Ee ff.\n\nGg hh. Ii jj.",
        "Aa bb. Cc dd." + _needle(k2) + " Ee ff.\n\nGg hh. Ii jj.",
        "Aa bb. Cc dd. Ee ff.\n\nGg hh." + _needle(k3) + " Ii jj.",
        "Aa bb. Cc dd. Ee ff.\n\nGg hh. Ii jj." + _needle(k4),
    ]
    assert [s.extra["insert_char"] for s in samples] == [0, 13, 28, 35]
    # the haystack is the decoded first `length` tokens: 20 tokens = the first essay (cut 10 -> after "bb.")
    short = next(passkey.load(tokenizer=tok, lengths=[20], depths=[0.5], samples=1, text_dir=two_essays))
    assert short.context == "Aa bb." + _needle(k1) + " Cc dd. Ee ff."
    # the whole ". " must lie before the cut: cut 7 on "Aa bb. Cc." finds "bb. " (indices 5, 6), cut 6 not
    assert passkey.insert_at_depth("Aa bb. Cc.", "|", 0.7) == ("Aa bb.| Cc.", 6)
    assert passkey.insert_at_depth("Aa bb. Cc.", "|", 0.6) == ("|Aa bb. Cc.", 0)


def test_passkey_samples_follow_peers(tok):
    samples = list(passkey.load(tokenizer=tok, lengths=[1500]))
    assert len(samples) == 9 and len({s.sample_id for s in samples}) == 9
    assert [s.sample_id for s in samples[:4]] == ["len1500-depth0.1-key0", "len1500-depth0.1-key1",
                                                  "len1500-depth0.1-key2", "len1500-depth0.5-key0"]
    assert [s.extra["depth"] for s in samples] == [0.1] * 3 + [0.5] * 3 + [0.9] * 3
    assert [s.gold[0] for s in samples] == _peers_keys(9)  # depth 0.1's three keys first
    haystack = tok.decode(_ids(tok, essays.essay_text(separator="\n\n"))[:1500])
    for s in samples:
        key, depth, at = s.gold[0], s.extra["depth"], s.extra["insert_char"]
        assert s.question == PEERS_QUESTION and s.answer_prefix == ""
        assert s.chat and s.max_new_tokens == 12 and s.metric == "first_int_match"
        assert s.extra["length"] == 1500 and s.context.count(_needle(key)) == 1
        assert s.context == haystack[:at] + _needle(key) + haystack[at:]
        cut = int(len(haystack) * depth)
        # right after a ". " ending by the cut (at 0 when none: the first essay's opening 150 characters)
        assert at + 1 <= cut and (haystack[at - 1: at + 1] == ". " if at else depth == 0.1)
        assert haystack.find(". ", at, cut) == -1  # and no later one was skipped
    assert list(passkey.load(tokenizer=tok, lengths=[1500], chat_template=False))[0].chat is False


def test_passkey_deterministic_from_seed(tok):
    first = list(passkey.load(tokenizer=tok, lengths=[600]))
    assert first == list(passkey.load(tokenizer=tok, lengths=[600], seed=7))
    assert [s.gold for s in first] != [s.gold for s in passkey.load(tokenizer=tok, lengths=[600], seed=8)]
    assert list(passkey.load(tokenizer=tok, lengths=[600], limit=4)) == first[:4]
    both = list(passkey.load(tokenizer=tok, lengths=[600, 900]))
    assert [s.gold for s in both[:9]] == [s.gold for s in both[9:]]  # the same keys at every length
    assert [s.extra["length"] for s in both] == [600] * 9 + [900] * 9


def test_passkey_first_number_metric():
    assert all(metrics.score("first_int_match", answer, ["12345"]) == 1.0
               for answer in ("12345", "The key is 12345.", " 12345 is the pass key", "12345\n67890"))
    assert not any(metrics.score("first_int_match", answer, ["12345"])
                   for answer in ("1 12345", "", "12345678", "The pass key", "123456", "012345", "12,345"))
    sample = Sample(task="passkey", sample_id="x", context="", question=PEERS_QUESTION,
                            answer_prefix="", gold=["12345"], metric="first_int_match", max_new_tokens=12)
    assert score_prediction(sample, "The pass key is 12345.") == 1.0
    assert score_prediction(sample, "It is 9, then 12345.") == 0.0


def test_niah_grid_placement_and_budget(tok):
    lengths, depths = [800, 1200], [0.0, 0.33, 0.5, 1.0]
    samples = list(niah.load(tokenizer=tok, lengths=lengths, depths=depths))
    assert [(s.extra["length"], s.extra["depth"]) for s in samples] == [(n, d) for n in lengths for d in depths]
    assert samples == list(niah.load(tokenizer=tok, lengths=lengths, depths=depths))
    needle_len = len(_ids(tok, niah.NEEDLE))
    for s in samples:
        assert not s.chat and s.stop == ["\n"] and s.max_new_tokens == 30
        haystack = s.context.removeprefix("This is a very long story book: <book> ").removesuffix(" </book>.\n")
        length = s.extra["length"] - niah.ANSWER_BUFFER - needle_len
        _assert_at_depth(tok, haystack, niah.NEEDLE, s.extra["depth"], length, s.extra["insert_token"])
        context_ids, rest_ids = encode_prompt(tok, s)
        assert len(context_ids) + len(rest_ids) + s.max_new_tokens <= s.extra["length"]
    assert samples[-1].context.endswith(niah.NEEDLE + " </book>.\n")  # depth 1.0 appends


def _needles(context: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", context):
        found.setdefault(key, []).append(value)
    return found


def _queried_keys(question: str) -> list[str]:
    query = re.search(r" for (.+) mentioned", question).group(1)
    return [k for k in re.split(r", and |, | and ", query) if k]


@pytest.fixture(scope="module")
def ruler_samples(tok):
    return {task: list(ruler.load(tokenizer=tok, tasks=[task], lengths=[2048], samples=2)) for task in ruler.TASKS}


def test_ruler_deterministic_and_fits_budget(tok, ruler_samples):
    for task, samples in ruler_samples.items():
        assert samples == list(ruler.load(tokenizer=tok, tasks=[task], lengths=[2048], samples=2)), task
        assert samples[0] != samples[1]
        for s in samples:
            context_ids, rest_ids = encode_prompt(tok, s)
            assert len(context_ids) + len(rest_ids) + s.max_new_tokens <= 2048, task
            assert s.metric == "string_match_all" and s.extra["answer_after_template"]
    again = list(ruler.load(tokenizer=tok, tasks=["vt"], lengths=[2048], samples=2, seed=1))
    assert again[0].gold != ruler_samples["vt"][0].gold


def test_ruler_niah_answers_by_construction(ruler_samples):
    for task, cfg in ruler.NIAH_TASKS.items():
        for s in ruler_samples[task]:
            needles = _needles(s.context)
            keys = _queried_keys(s.question)
            assert len(keys) == cfg.n_queries, task
            assert sorted(v for k in keys for v in needles[k]) == sorted(s.gold), task
            assert all(len(needles[k]) == cfg.n_values for k in keys)
            assert all(s.context.count(v) == 1 for v in s.gold)
            assert cfg.n_queries * cfg.n_values > 1 or " is" in s.answer_prefix


def test_ruler_vt_cwe_fwe_answers_by_construction(ruler_samples):
    for s in ruler_samples["vt"]:
        task_text = s.context.split("\n\n", 2)[-1]  # after the in-context example
        value = re.search(r"assigned the value (\d+)", s.question).group(1)
        assign = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", task_text))
        reached = {name for name, source in assign.items() if source == value}
        while True:
            more = {name for name, source in assign.items() if source.removeprefix("VAR ") in reached} - reached
            if not more:
                break
            reached |= more
        assert reached == set(s.gold) and len(s.gold) == 5
    for s in ruler_samples["cwe"]:
        task_list = s.context.rsplit("Memorize the ones that appear most often.\n", 1)[1]
        counts = Counter(re.findall(r"\d+\. (\S+)", task_list))
        assert {w for w, _ in counts.most_common(10)} == set(s.gold)
        assert min(counts[w] for w in s.gold) > max(c for w, c in counts.items() if w not in s.gold)
    for s in ruler_samples["fwe"]:
        counts = Counter(s.context.split("coded words. ", 1)[1].split())
        ranked = [w for w, _ in counts.most_common() if w != "..."]
        assert ranked[:3] == s.gold
        assert counts[s.gold[2]] > max(counts[w] for w in ranked[3:])


def test_bad_generator_arguments(tok):
    with pytest.raises(ValueError, match="valid tasks"):
        list(ruler.load(tokenizer=tok, tasks=["nope"]))
    with pytest.raises(ValueError, match="too short"):
        list(ruler.load(tokenizer=tok, tasks=["vt"], lengths=[200]))
    with pytest.raises(ValueError, match="no room"):
        list(niah.load(tokenizer=tok, lengths=[250]))
    with pytest.raises(ValueError, match="depth"):
        list(passkey.load(tokenizer=tok, lengths=[300], depths=[1.5]))
    with pytest.raises(ValueError, match="depths"):
        list(passkey.load(tokenizer=tok, lengths=[300], depths=[]))
    with pytest.raises(ValueError, match="samples and lengths"):
        list(passkey.load(tokenizer=tok, lengths=[300], samples=0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(passkey.load(tokenizer=tok, lengths=[300], max_new_tokens=0))


def test_metrics_on_hand_made_predictions():
    # spec/benchmarks.md section 8 fixtures
    assert string_match_all("... 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
    assert string_match_part("Paris is the answer", ["Paris", "City of Light"]) == 1.0
    needle = [niah.NEEDLE.strip()]
    assert niah.niah_rouge1_f("eat a sandwich and sit in Dolores Park on a sunny day.", needle) == \
        pytest.approx(0.727, abs=5e-4)
    assert niah.niah_rouge1_f("go to the Golden Gate Bridge.", needle) == pytest.approx(0.148, abs=5e-4)
    # recall: all 12 answer words are among the needle's 21 (precision 1, so F = 2R / (1 + R) = 0.727)
    assert niah.niah_rouge1_recall("eat a sandwich and sit in Dolores Park on a sunny day.", needle) == \
        pytest.approx(12 / 21)
    assert niah.niah_rouge1_recall(niah.NEEDLE + " and more words", needle) == 1.0
    assert string_match_part("The pass key is 71432.", ["71432"]) == 1.0  # passkey hit
    assert string_match_part("71433", ["71432"]) == 0.0
