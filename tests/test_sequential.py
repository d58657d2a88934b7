"""Compress once, ask many: the sequential passkey task, its prompts and its scoring by hand."""

from __future__ import annotations

import re

import pytest
import torch
from eval_helpers import tiny_tokenizer

import heterocache as hc
from heterocache.eval.runner import generate_turns, next_turn_ids
from heterocache.eval.tasks import passkey

ESSAY = "Alpha beta gamma. Delta epsilon zeta. Eta theta iota. Kappa lambda mu. " * 40


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def text_dir(tmp_path):
    (tmp_path / "a.txt").write_text(ESSAY)
    return tmp_path


def test_sequential_prompts_are_deterministic_and_hide_every_key(tok, text_dir):
    samples = list(passkey.load(tokenizer=tok, lengths=[900], samples=2, sequential=3, text_dir=text_dir))
    assert samples == list(passkey.load(tokenizer=tok, lengths=[900], samples=2, sequential=3, text_dir=text_dir))
    assert [s.sample_id for s in samples] == ["len900-seq3-key0", "len900-seq3-key1"]
    other_seed = passkey.load(tokenizer=tok, lengths=[900], samples=2, sequential=3, text_dir=text_dir, seed=5)
    assert [s.gold for s in samples] != [s.gold for s in other_seed]
    # its own defaults: seed 1234, 12 new tokens (a named answer is 11 tokens), substring match
    assert samples == list(passkey.load(tokenizer=tok, lengths=[900], samples=2, sequential=3, text_dir=text_dir,
                                        seed=1234))
    assert all(s.max_new_tokens == 12 and s.metric == "string_match_part" for s in samples)
    for s in samples:
        names = re.findall(r"The (\w+) pass key is (\d{5})\. Remember it\. \2 is the \1 pass key\.", s.context)
        assert [n for n, _ in names] == ["first", "second", "third"]  # in depth order
        keys = dict(names)
        asked = [s.question] + [t["question"] for t in s.extra["turns"]]
        golds = [s.gold] + [t["gold"] for t in s.extra["turns"]]
        assert sorted(re.search(r"the (\w+) pass key", q).group(1) for q in asked) == sorted(keys)
        for question, gold in zip(asked, golds):
            assert gold == [keys[re.search(r"the (\w+) pass key", question).group(1)]]
        assert s.question.startswith("\n\n") and not any(t["question"].startswith("\n") for t in s.extra["turns"])
    with pytest.raises(ValueError, match="sequential=9"):
        list(passkey.load(tokenizer=tok, lengths=[900], sequential=9, text_dir=text_dir))


class ScriptedModel:
    """Answers each question with a scripted string then <|im_end|>; records every fed token."""

    def __init__(self, tok, answers):
        self.tok, self.answers, self.fed = tok, answers, []
        self.device = torch.device("cpu")

    def __call__(self, input_ids, **kwargs):
        return self.forward(input_ids, **kwargs)

    def forward(self, input_ids, past_key_values=None, **kwargs):
        self.fed.extend(input_ids[0].tolist())
        text = self.tok.decode(self.fed)
        turn = text.count("<|im_start|>assistant\n")
        partial = text.rsplit("<|im_start|>assistant\n", 1)[-1]
        target = self.tok(self.answers[turn - 1], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        done = len(self.tok(partial, add_special_tokens=False)["input_ids"]) if partial else 0
        logits = torch.zeros(1, 1, len(self.tok))
        logits[0, 0, target[min(done, len(target) - 1)]] = 1.0
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_turns_are_asked_in_order_and_scored_by_hand(tok, text_dir, mode):
    sample = next(passkey.load(tokenizer=tok, lengths=[600], samples=1, sequential=3, text_dir=text_dir))
    golds = [sample.gold[0]] + [t["gold"][0] for t in sample.extra["turns"]]
    answers = [golds[0], "00000", f"It is {golds[2]}."]  # right, wrong, right
    model = ScriptedModel(tok, answers)
    from heterocache.eval.tasks.base import encode_prompt

    context_ids, rest_ids = encode_prompt(tok, sample)
    out = generate_turns(model, tok, sample, context_ids, rest_ids, None, mode, 12, {tok.eos_token_id})
    assert out["predictions"] == answers
    # the conversation fed through the cache is exactly the chat transcript, one turn after the other
    expected = tok.decode(context_ids + rest_ids)
    for answer, turn in zip(answers, sample.extra["turns"]):
        expected += answer + "<|im_end|>\n<|im_start|>user\n" + turn["question"] + "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(model.fed) == expected + answers[-1][:-1]  # the last token of the last answer is not fed
    from heterocache.eval.runner import metrics_score

    scores = [metrics_score(sample, p, [g]) for p, g in zip(out["predictions"], golds)]
    assert scores == [1.0, 0.0, 1.0]


def test_next_turn_ids_without_chat(tok, text_dir):
    sample = next(passkey.load(tokenizer=tok, lengths=[600], samples=1, sequential=2, text_dir=text_dir,
                               chat_template=False))
    ids = next_turn_ids(tok, sample, ["12345"], sample.extra["turns"][0]["question"])
    assert tok.decode(ids) == "\n\n" + sample.extra["turns"][0]["question"]


def test_sequential_runs_on_a_real_cache(tok, text_dir):
    from eval_helpers import tiny_model

    from heterocache.eval.tasks.base import encode_prompt

    model = tiny_model(len(tok))
    sample = next(passkey.load(tokenizer=tok, lengths=[400], samples=1, sequential=2, text_dir=text_dir))
    context_ids, rest_ids = encode_prompt(tok, sample)
    runs = []
    for method in ("full", "snapkv"):
        cache = hc.make_cache(model, method, 1.0 if method == "full" else 0.25)
        runs.append(generate_turns(model, tok, sample, context_ids, rest_ids, cache, "decode", 4, {257}))
    assert all(len(r["predictions"]) == 2 for r in runs)
    assert runs[0]["decode_steps"] > 0


def test_runner_writes_one_line_per_sample_with_every_turn(tok, text_dir, tmp_path):
    from eval_helpers import tiny_model

    from heterocache.eval.results import read_jsonl
    from heterocache.eval.runner import RunConfig, run_samples

    model = tiny_model(len(tok))
    samples = list(passkey.load(tokenizer=tok, lengths=[400], samples=1, sequential=2, text_dir=text_dir,
                                max_new_tokens=3))
    config = RunConfig(out_dir=tmp_path, methods=["full", "snapkv"], keeps=[0.5], suite="passkey",
                       question_mode="decode", progress=False)
    lines = read_jsonl(run_samples(model, tok, samples, config))
    assert sorted(line["method"] for line in lines) == ["full", "snapkv"]
    for line in lines:
        assert [t["gold"] for t in line["turns"]] == [samples[0].gold, samples[0].extra["turns"][0]["gold"]]
        assert line["score"] == sum(t["score"] for t in line["turns"]) / 2
    # the run's summary covers sequential lines too (they have no single prefill time)
    from heterocache.eval.report import summarize

    rows = {row["method"]: row for row in summarize(tmp_path)["tasks"]}
    assert sorted(rows) == ["full", "snapkv"]
    for method, row in rows.items():
        mine = [line for line in lines if line["method"] == method]
        assert row["n"] == 1 and row["prefill_s"] is None
        assert row["score"] == round(100 * mine[0]["score"], 2)
