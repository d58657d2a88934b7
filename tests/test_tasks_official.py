"""Official-benchmark loaders on hand-written fixtures in the official formats (tests/fixtures)."""

import json
from pathlib import Path

import pytest

from heterocache.eval.metrics import longbench_e_buckets, longbench_v2_breakdown, score
from heterocache.eval.tasks import infinitebench, longbench, longbench_v2
from heterocache.eval.tasks.common import count_tokens, make_sample, resolve_tasks
from heterocache.eval.tasks.registry import TASK_SUITES, list_tasks, load_suite, register_suite

FIXTURES = Path(__file__).parent / "fixtures"
LB, V2, IB = FIXTURES / "longbench", FIXTURES / "longbench_v2", FIXTURES / "infinitebench"


def one(task, **kw):
    return {s.sample_id: s for s in longbench.load_tasks(LB, [task], **kw)}


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained here on the fixture text, so the test never needs a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [path.read_text(encoding="utf-8") for path in sorted(FIXTURES.rglob("*.json*"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def test_longbench_qa_split_and_fields():
    sample = one("hotpotqa")["fx-hq-1"]
    assert (sample.task, sample.metric, sample.max_new_tokens, sample.chat) == ("hotpotqa", "qa_f1", 32, True)
    assert sample.gold == ["Eiffel Tower", "Paris"]
    assert "The following are given passages.\nPassage 1: The Eiffel Tower is in Paris.\n\n" in sample.context
    assert sample.context.endswith("without any other words.\n\n")  # repeated instruction stays in context
    assert (sample.question, sample.answer_prefix) == ("Question: Where is the tower?\n", "Answer:")
    assert sample.extra["length"] == 9 and sample.stop == []


@pytest.mark.parametrize("task", ["hotpotqa", "trec", "samsum", "gov_report", "passage_count", "lcc",
                                  "repobench-p", "multifieldqa_zh", "lsht", "passage_retrieval_en"])
def test_longbench_split_preserves_the_full_prompt(task):
    records = [json.loads(line) for line in (LB / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]
    for sample, record in zip(longbench.load_tasks(LB, [task]), records, strict=True):
        assert sample.prompt == longbench.TASKS[task].template.format(**record)


def test_longbench_task_families():
    trec = one("trec")["fx-trec-1"]
    assert (trec.chat, trec.metric, trec.max_new_tokens) == (False, "classification", 64)
    assert (trec.question, trec.answer_prefix) == ("What is the capital?\n", "Type:")  # label moved
    assert trec.extra["all_classes"] == ["food", "other food", "color"]
    assert trec.context.endswith("Question: What is a cat?\nType: food\n")
    samsum = one("samsum")["fx-ss-1"]
    assert samsum.stop == ["\n"] and samsum.extra["min_new_tokens"] == 1 and samsum.answer_prefix == "Summary:"
    gov = one("gov_report")["fx-gr-1"]
    assert (gov.question, gov.answer_prefix, gov.metric, gov.max_new_tokens) == ("", "Summary:", "rouge_l", 512)
    count = one("passage_count")["fx-pc-1"]
    assert (count.metric, count.answer_prefix, count.question) == ("count", "The final answer is: ", "")
    retr = one("passage_retrieval_en")["fx-pr-1"]
    assert retr.context.endswith("The following is an abstract.\n\n") and retr.answer_prefix == "The answer is: "
    assert retr.question.startswith("A tall tower of iron") and retr.metric == "retrieval"
    lcc = one("lcc")["fx-lcc-1"]
    assert lcc.context.startswith("Please complete the code given below. \ndef add(a, b):")
    assert (lcc.question, lcc.answer_prefix, lcc.chat, lcc.metric) == ("", "Next line of code:\n", False, "code_sim")
    repo = one("repobench-p")["fx-rb-1"]
    assert repo.question == "import os\npath = os.getcwd()\n"
    zh = one("multifieldqa_zh")["fx-mz-1"]
    assert (zh.question, zh.answer_prefix, zh.metric, zh.max_new_tokens) == ("问题：中国的首都是哪里？\n", "回答：",
                                                                            "qa_f1_zh", 64)
    lsht = one("lsht")["fx-ls-1"]
    assert (lsht.answer_prefix, lsht.chat, lsht.extra["all_classes"]) == ("类别：", False, ["财经", "体育", "科技"])
    assert one("hotpotqa", chat_template=False)["fx-hq-1"].chat is False
    assert len(one("hotpotqa", limit=1)) == 1
    assert score(trec.metric, "\nother food\ncolor", trec.gold, trec) == 1.0  # first line only


def test_longbench_templates_override():
    tpl = {"hotpotqa": "Passages:\n{context}\n\nQuestion: {input}\nAnswer:"}
    sample = one("hotpotqa", templates=tpl)["fx-hq-1"]
    assert sample.context == "Passages:\nPassage 1: The Eiffel Tower is in Paris.\n\n"
    with pytest.raises(ValueError, match="hotpotqa"):
        one("hotpotqa", templates={"hotpotqa": "{context} Answer:"})


def test_longbench_e_and_buckets():
    samples = list(longbench.load_tasks_e(LB, ["qasper"]))  # plain name is an alias of qasper_e
    assert [s.task for s in samples] == ["qasper_e"] * 3 and samples[0].max_new_tokens == 128
    scores = [score(s.metric, g, s.gold, s) for s, g in zip(samples, ["Alpha corpus", "12", "no"])]
    assert longbench_e_buckets(scores, [s.extra["length"] for s in samples]) == {
        "0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}


def test_missing_data_and_unknown_task():
    with pytest.raises(FileNotFoundError, match="does not exist.*THUDM/LongBench"):
        list(longbench.load_tasks(FIXTURES / "nowhere", ["hotpotqa"]))
    with pytest.raises(FileNotFoundError, match=r"'dureader.jsonl'.*data\.zip"):
        list(longbench.load_tasks(LB, ["hotpotqa", "dureader"]))
    with pytest.raises(FileNotFoundError, match="data.json.*LongBench-v2"):
        list(longbench_v2.load_tasks(LB))
    with pytest.raises(ValueError, match="valid tasks: narrativeqa, qasper"):
        list(longbench.load_tasks(LB, ["hotpot"]))
    with pytest.raises(ValueError, match="passkey"):
        list(infinitebench.load_tasks(IB, ["pass_key"]))
    assert resolve_tasks("zh", list(longbench.TASKS), [], "longbench", groups={"zh": longbench.CHINESE_TASKS}) == [
        "multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"]


def test_malformed_line_is_reported_and_rest_loads():
    problems = []
    with pytest.warns(UserWarning, match=r"musique.jsonl:2: malformed JSON"):
        samples = list(longbench.load_tasks(LB, ["musique"], problems=problems))
    assert [s.sample_id for s in samples] == ["fx-mu-1", "fx-mu-3"]
    assert len(problems) == 1 and problems[0].line == 2 and problems[0].path.endswith("musique.jsonl")


def test_bad_json_array_and_bad_records(tmp_path):
    (tmp_path / "data.json").write_text('[{"_id": "a"},\n {"_id": "b"', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.json:2: invalid JSON array"):
        list(longbench_v2.load_tasks(tmp_path))
    good = json.loads((V2 / "data.json").read_text(encoding="utf-8"))[0]
    (tmp_path / "data.json").write_text(json.dumps([good, {"_id": "no-fields"}, 7, {**good, "answer": "E"}]))
    problems = []
    with pytest.warns(UserWarning):
        samples = list(longbench_v2.load_tasks(tmp_path, problems=problems))
    assert [s.sample_id for s in samples] == ["fx-v2-1"]
    assert [(p.line, p.message[:14]) for p in problems] == [
        (2, "missing fields"), (3, "record is not "), (4, "answer 'E' is ")]
    (tmp_path / "data.jsonl").write_text(json.dumps(good) + "\n")  # JSONL is accepted too
    (tmp_path / "data.json").unlink()
    (tmp_path / "data.jsonl").rename(tmp_path / "data.json")
    assert len(list(longbench_v2.load_tasks(tmp_path))) == 1


def test_middle_truncation_in_tokens(tokenizer):
    full = one("narrativeqa")["fx-nq-1"]
    ids = tokenizer(full.prompt, add_special_tokens=False)["input_ids"]
    limit = 200
    assert len(ids) > 3 * limit
    sample = one("narrativeqa", tokenizer=tokenizer, max_prompt_tokens=limit)["fx-nq-1"]
    assert sample.extra == {**sample.extra, "prompt_tokens": len(ids), "truncation": "middle"}
    head = tokenizer.decode(ids[: limit // 2], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-(limit // 2):], skip_special_tokens=True)
    assert sample.prompt == head + tail
    assert (sample.question, sample.answer_prefix) == (full.question, full.answer_prefix)
    assert sample.context.startswith(full.context[:40]) and sample.context.endswith(full.context[-40:])
    assert abs(count_tokens(tokenizer, sample.prompt) - limit) <= 2  # re-tokenized across the seam
    untouched = one("narrativeqa", tokenizer=tokenizer, max_prompt_tokens=len(ids))["fx-nq-1"]
    assert untouched.prompt == full.prompt and "truncation" not in untouched.extra


def test_truncation_keeps_a_long_question_whole(tokenizer):
    question = "Question: " + "which ship passed the northern rocks first " * 6 + "\n"
    sample = make_sample(task="t", sample_id="1", context="On day 1 the keeper counted ships. " * 20,
                         question=question, answer_prefix="Answer:", gold=["x"], metric="qa_f1",
                         max_new_tokens=8, tokenizer=tokenizer, max_prompt_tokens=40)
    assert sample.extra["truncation"] == "middle-context-only" and sample.question == question
    assert count_tokens(tokenizer, sample.prompt) <= count_tokens(tokenizer, question + "Answer:") + 4
    with pytest.raises(ValueError, match="tokenizer"):
        make_sample(task="t", sample_id="1", context="c", question="", answer_prefix="", gold=["x"],
                    metric="qa_f1", max_new_tokens=8, max_prompt_tokens=40)


def test_longbench_v2(tokenizer):
    samples = list(longbench_v2.load_tasks(V2))
    assert [s.sample_id for s in samples] == ["fx-v2-1", "fx-v2-2", "fx-v2-3"]
    first = samples[0]
    assert first.context.endswith("<text>\nBob left. Then Ann left.\n</text>\n\n")
    assert first.question.startswith("What is the correct answer to this question: Who left first?\nChoices:\n(A) Ann")
    assert first.question.endswith('(D) Di\n\nFormat your response as follows: "The correct answer is '
                                   '(insert answer here)".')
    assert (first.answer_prefix, first.gold, first.metric, first.chat, first.max_new_tokens) == (
        "", ["B"], "choice_v2", True, 128)
    assert first.extra["difficulty"] == "easy" and first.extra["length"] == "short"
    assert "What does 'kala' mean?\n" in samples[2].question and "<text>\nkala: fish\nlintu: bird\n</text>" in \
        samples[2].context  # fields are stripped
    judges = [score(s.metric, f"The correct answer is ({x})", s.gold, s) for s, x in zip(samples, "BCA")]
    assert longbench_v2_breakdown(judges, [s.extra["difficulty"] for s in samples],
                                  [s.extra["length"] for s in samples])["overall"] == 66.7
    bare = list(longbench_v2.load_tasks(V2, ["longbench_v2_nocontext"], metric="choice_v2_lenient"))
    assert bare[0].context == "" and bare[0].metric == "choice_v2_lenient" and "Bob left" not in bare[0].prompt
    cut = list(longbench_v2.load_tasks(V2, tokenizer=tokenizer, max_prompt_tokens=30, limit=1))[0]
    assert cut.extra["prompt_tokens"] > 30 and cut.question == first.question
    with pytest.raises(ValueError, match="metric must be one of"):
        list(longbench_v2.load_tasks(V2, metric="qa_f1"))


def test_infinitebench_all_tasks():
    problems = []
    with pytest.warns(UserWarning, match=r"math_find.jsonl:2: bad record"):
        samples = list(infinitebench.load_tasks(IB, "all", problems=problems))
    by_task = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    assert set(by_task) == set(infinitebench.TASKS) and len(problems) == 1
    for task, group in by_task.items():
        spec = infinitebench.TASKS[task]
        assert all((s.metric, s.max_new_tokens, s.chat) == (spec.metric, spec.max_new_tokens, True) for s in group)
    key = by_task["passkey"][0]
    assert (key.sample_id, key.gold, key.question, key.answer_prefix) == (
        "0", ["71432"], "What is the pass key?\n\n", "The pass key is")
    assert "The pass key is 71432." in key.context and score(key.metric, " 71432.", key.gold, key) == 1.0
    choice = by_task["longbook_choice_eng"]
    assert [c.gold for c in choice] == [["Working in the dairy", "C"], ["North", "A"]]
    assert choice[0].question.startswith("Question: What did Mara do every morning?\nA. Reading poems\n")
    assert choice[0].answer_prefix == "The letter of the correct answer is"
    run = by_task["code_run"][0]
    assert run.answer_prefix == "The value of func_2(19) is" and "func_2" in run.context
    assert run.gold == ["42"] and score(run.metric, " 42", run.gold, run) == 1.0
    find = by_task["math_find"][0]
    assert find.context.startswith("What is the largest number in the following list?\n\n[3, 9")
    assert score(find.metric, "9", find.gold, find) == 1.0
    calc = by_task["math_calc"][0]
    assert calc.gold == ["[1, 4, 8, 5]"] and score(calc.metric, "[1, 4, 8, 3]", calc.gold, calc) == 0.75
    debug = by_task["code_debug"][0]
    assert debug.gold == ["func_b", "B"] and debug.answer_prefix == "The correct option is:"
    assert debug.question.startswith("Options:\nA. func_a\n")
    dia = by_task["longdialogue_qa_eng"][0]
    assert dia.question == "" and score(dia.metric, "ACE", dia.gold, dia) == 1.0
    assert by_task["longbook_qa_chn"][0].answer_prefix == "答案："


def test_infinitebench_defaults_and_chat_flag():
    samples = list(infinitebench.load_tasks(IB, ["passkey", "kv_retrieval"], chat_template=False))
    assert {s.task for s in samples} == {"passkey", "kv_retrieval"} and not any(s.chat for s in samples)
    assert "code_run" not in infinitebench.DEFAULT_TASKS and len(infinitebench.DEFAULT_TASKS) == 10


def test_registry():
    tasks = list_tasks()
    assert set(tasks) >= {"longbench", "longbench_e", "longbench_v2", "infinitebench"}
    assert len(tasks["longbench"]) == 21 and len(tasks["longbench_e"]) == 13 and len(tasks["infinitebench"]) == 12
    assert list_tasks("longbench_v2") == ["longbench_v2", "longbench_v2_nocontext"]
    assert [s.sample_id for s in load_suite("longbench", LB, tasks=["hotpotqa"], limit=1)] == ["fx-hq-1"]
    assert len(list(load_suite("longbench_v2", V2))) == 3
    with pytest.raises(ValueError, match="valid suites: longbench"):
        load_suite("longbench3", LB)

    def fake(data_dir, tasks=None, tokenizer=None, max_prompt_tokens=None, limit=None, chat_template=None,
             problems=None, **options):
        yield make_sample(task="toy", sample_id="0", context="c", question="q", answer_prefix="a", gold=["x"],
                          metric="exact_match", max_new_tokens=options.get("n", 1))

    register_suite("toy_test", fake, ["toy"], needs_data=False)
    try:
        assert [s.max_new_tokens for s in load_suite("toy_test", n=3)] == [3]
        assert list_tasks("toy_test") == ["toy"]
    finally:
        del TASK_SUITES["toy_test"]
