"""Metric definitions on hand-computed cases (spec/benchmarks.md sections 1-4 and 8)."""

import pytest

from heterocache.eval import metrics as M
from heterocache.eval.metrics import score
from heterocache.eval.tasks.base import Sample

approx = pytest.approx


def test_normalisation():
    assert M.normalize_en("The Cat's  hat, an apple!") == "cats hat apple"
    assert M.normalize_en("theater anthem") == "theater anthem"  # articles only as whole words
    assert M.normalize_zh("Hello，世界！ A b。") == "hello世界ab"
    assert M.normalize_zh("《书名》") == "《书名"  # the official CJK set lacks the opening 《


@pytest.mark.parametrize("pred, gold, expected", [
    ("The Eiffel Tower.", ["Eiffel Tower"], 1.0),
    ("Paris, France", ["Paris"], 2 / 3),            # P = 1/2, R = 1
    ("a big red dog", ["the red dog"], 0.8),        # [big, red, dog] vs [red, dog]
    ("London", ["Paris"], 0.0),
    ("red red dog", ["red dog dog"], 2 / 3),        # multiset overlap 2, P = R = 2/3
    ("Paris", ["London", "Paris"], 1.0),            # max over gold
])
def test_qa_f1(pred, gold, expected):
    assert score("qa_f1", pred, gold) == approx(expected)


def test_chinese_f1():
    # jieba: 北京/是/中国/的/首都/。 -> 5 tokens after dropping punctuation, 1 in common
    assert score("qa_f1_zh", "北京是中国的首都。", ["北京"]) == approx(1 / 3)
    assert score("qa_f1_zh_char", "北京市", ["北京"]) == approx(0.8)  # InfiniteBench: characters
    assert score("qa_f1_zh_char", "。", ["北京"]) == 0.0


@pytest.mark.parametrize("pred, gold, expected", [
    ("the cat sat on the mat", "the cat sat", 0.75),  # LCS 3; unique words 5 vs 3: P 3/5, R 1
    ("The Cat sat", "the cat sat", 1 / 3),            # case-sensitive: only "sat"
    ("the cat sat. the dog ran", "the dog ran. the cat sat", 1.0),
    ("", "the cat sat", 0.0),                         # the package raises; scored 0
])
def test_rouge_l(pred, gold, expected):
    assert score("rouge_l", pred, [gold]) == approx(expected, abs=1e-6)


def test_rouge_zh_and_lsum():
    # jieba: [今天天气, 很, 好] vs [今天天气, 不错]: LCS 1, P 1/3, R 1/2
    assert score("rouge_zh", "今天天气很好", ["今天天气不错"]) == approx(0.4, abs=1e-6)
    assert score("rouge_lsum", "the cat sat", ["the cat sat on the mat"]) == approx(2 / 3)  # P 1, R 1/2
    assert score("rouge_lsum", "The cat, sat.", ["the cat sat"]) == approx(1.0)  # lowercased, punct. dropped
    # rouge-score's union LCS maps "the dog ran" onto the first "the": 3 hits of 6 (spec table says 0.6667)
    assert score("rouge_lsum", "the cat sat.\nthe dog ran.", ["the cat sat on the mat."]) == approx(0.5)


CLASSES = {"all_classes": ["food", "other food", "color"]}


def test_classification():
    assert score("classification", "other food", ["other food"], CLASSES) == 1.0
    assert score("classification", "food or color", ["color"], CLASSES) == 0.5
    assert score("classification", "nothing", ["color"], CLASSES) == 0.0
    nested = {"all_classes": ["ab", "abc", "abcd"]}
    # the official loop skips "abc" after removing "ab": 2 matches left
    assert score("classification", "abcd", ["abcd"], nested) == 0.5
    assert score("classification", "abcd", ["abcd"], nested, strict_official=False) == 1.0
    sample = Sample("trec", "1", "", "", "", ["color"], "classification", 64, extra=CLASSES)
    assert score("classification", "color", ["color"], sample) == 1.0
    with pytest.raises(ValueError, match="all_classes"):
        score("classification", "color", ["color"])


def test_count_and_retrieval():
    assert score("count", "There are 12 unique paragraphs out of 15", ["12"]) == 0.5
    assert score("count", "none", ["12"]) == 0.0
    assert score("retrieval", "Paragraph 7, maybe Paragraph 3", ["Paragraph 7"]) == 0.5
    assert score("retrieval", "7", ["Paragraph 7"]) == 1.0
    assert score("retrieval", "I do not know", ["Paragraph 7"]) == 0.0
    assert score("retrieval_zh", "段落5", ["段落5"]) == 1.0
    assert score("retrieval_zh", "段落5和段落15", ["段落5"]) == 0.5


def test_code_sim():
    assert score("code_sim", "```python\n# comment\nx = foo(1)", ["x = foo(1)"]) == 1.0
    assert score("code_sim", "x = foo(2)", ["x = foo(1)"]) == 0.9  # 9 of 10 chars match
    assert score("code_sim", "# only comment", ["x = foo(1)"]) == 0.0
    assert score("code_sim", "\n\n// c\nreturn x", ["return x"]) == 1.0
    assert M.fuzz_ratio("abcd", "abce") == 75 and M.fuzz_ratio("", "") == 100 and M.fuzz_ratio("a", "") == 0


def test_exact_and_first_int():
    assert score("exact_match", " 42\n", ["42"]) == 1.0 and score("exact_match", "42.", ["42"]) == 0.0
    assert score("first_int_match", "Key 2024: 71432", ["71432"]) == 0.0  # first digit run is 2024
    assert score("first_int_match", "71432. Done", ["71432"]) == 1.0


def test_infinitebench_retrieval_and_dialogue():
    assert score("kv_match", '"a1b2-c3": the value is "00a0-42".', ["00a0-42"]) == 1.0
    assert score("kv_match", "00a0-4", ["00a0-42"]) == 0.0
    assert score("ib_dialogue", "It is probably Ace.", ["ACE", "ACE ROTHSTEIN"]) == 1.0
    assert score("ib_dialogue", "Rothstein", ["ACE", "ACE ROTHSTEIN"]) == 0.0  # only label[0] counts


def test_infinitebench_choice_and_debug():
    gold = ["Working in the dairy", "C"]
    assert score("ib_choice", "The answer is C.", gold) == 1.0
    assert score("ib_choice", "C. milking", gold) == 1.0
    assert score("ib_choice", "Working in the dairy", gold) == 1.0
    assert score("ib_choice", "The answer is: Working in the dairy", gold) == 1.0
    assert score("ib_choice", "I pick B", gold) == 0.0  # first standalone A-D word is B
    assert score("ib_choice", "  ", gold) == 0.0
    debug = ["func_b", "B"]
    assert score("ib_code_debug", "I think the answer is: B", debug) == 1.0
    assert score("ib_code_debug", "B. func_b", debug) == 1.0
    assert score("ib_code_debug", "The answer is: func_b", debug) == 1.0
    assert score("ib_code_debug", "The answer is: A", debug) == 0.0


def test_infinitebench_numbers():
    assert score("ib_code_run", "The return value is: 42", ["42"], {"answer": [42]}) == 1.0
    assert score("ib_code_run", "The return value is: 42", ["42"], {"answer": ["42"]}) == 0.0  # official
    assert score("ib_code_run", "The return value is: 42", ["42"], {"answer": ["42"]},
                 strict_official=False) == 1.0
    assert score("ib_code_run", "The return value is: 42", ["42"]) == 1.0  # no raw label: coerced
    assert score("ib_code_run", "unknown", ["42"]) == 0.0
    assert score("ib_math_find", "The answer is 9.", ["9"]) == 1.0
    assert score("ib_math_find", "It is 3.5 or so", ["3.5"]) == 1.0
    assert score("ib_math_find", "9.0", ["9"]) == 0.0  # int label vs a float match
    assert score("ib_math_calc", "[1, 4, 8, 3]", ["[1, 4, 8, 5]"]) == 0.75
    assert score("ib_math_calc", "[1, -2]", ["[1, -2]"]) == 0.5  # strict: the minus sign is lost
    assert score("ib_math_calc", "[1, -2]", ["[1, -2]"], strict_official=False) == 1.0
    assert score("ib_math_calc", "1 4", ["[9]"], {"answer": [[1, 4, 8]]}) == approx(2 / 3)


def test_longbench_v2_extraction():
    assert M.extract_choice_v2("**The correct answer is (B)**") == "B"
    assert M.extract_choice_v2("The correct answer is C") == "C"
    assert M.extract_choice_v2("I think B") is None
    assert M.extract_choice_v2("I think B", lenient=True) == "B"
    # pitfall: the article "A" must never beat an explicit format, and is not an answer by default
    assert M.extract_choice_v2("A careful reading shows The correct answer is (D).", lenient=True) == "D"
    assert M.extract_choice_v2("A careful reading shows (C) fits.", lenient=True) == "C"
    assert M.extract_choice_v2("A careful reading is needed.") is None
    assert M.extract_choice_v2("A careful reading is needed.", lenient=True) == "A"
    assert score("choice_v2", "The correct answer is (B).", ["B"]) == 1.0
    assert score("choice_v2", "B", ["B"]) == 0.0
    assert score("choice_v2_lenient", "B", ["B"]) == 1.0
    assert score("choice_v2_compensated", "no idea", ["B"]) == 0.25


def test_ruler_string_match():
    gold = ["1234567", "7654321", "1111111"]
    assert score("string_match_all", "The numbers are 1234567 and 7654321.", gold) == approx(2 / 3)
    assert score("string_match_part", "PARIS is the answer", ["Paris", "City of Light"]) == 1.0
    assert score("string_match_part", "Rome", ["Paris", "City of Light"]) == 0.0


def test_score_postprocess_and_errors():
    trec = {"task": "trec", **CLASSES}
    # first line only for trec/triviaqa/samsum/lsht (leading newlines stripped first)
    assert score("classification", "\nfood\nother food", ["food"], trec) == 1.0
    assert score("classification", "\nfood\nother food", ["food"], CLASSES) == 0.5
    assert M.postprocess("\n\nA\nB", {"dataset": "samsum"}) == "A"
    assert M.postprocess("\n\nA\nB", Sample("triviaqa_e", "1", "", "", "", ["x"], "qa_f1", 32)) == "A"
    assert M.postprocess("\nA\nB", {"task": "hotpotqa"}) == "\nA\nB"
    assert score("qa_f1", "Paris", "Paris") == 1.0  # a bare gold string is accepted
    with pytest.raises(ValueError, match="valid metrics: .*qa_f1"):
        score("f1", "x", ["x"])
    with pytest.raises(ValueError, match="gold"):
        score("qa_f1", "x", [])


def test_aggregation():
    assert M.task_score([1.0, 0.5]) == 75.0
    assert M.longbench_e_buckets([1, 0, 0.5], [3000, 5000, 9000]) == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 50.0}
    assert M.longbench_e_buckets([1], [3999]) == {"0-4k": 100.0, "4-8k": None, "8k+": None}
    out = M.longbench_v2_breakdown([1, 0, 1], ["easy", "hard", "hard"], ["short", "short", "long"])
    assert out == {"overall": 66.7, "easy": 100.0, "hard": 50.0, "short": 50.0, "medium": None, "long": 100.0}
    assert M.average({"a": 10.0, "b": 20.0, "c": 60.0}) == 30.0
    assert M.average({"a": 10.0, "b": 20.0, "c": 60.0}, {"a": "qa", "b": "qa", "c": "code"}) == 37.5
    with pytest.raises(ValueError):
        M.task_score([])
