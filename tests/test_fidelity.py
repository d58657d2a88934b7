"""Teacher-forced fidelity: metric arithmetic on hand-made distributions, FullKV vs FullKV, resume."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from eval_helpers import tiny_model, tiny_tokenizer

from heterocache.eval.fidelity import (
    FidelityConfig,
    kl_per_token,
    nll_per_token,
    run_fidelity,
    top1_agreement,
    window_offsets,
)
from heterocache.eval.report import summarize
from heterocache.eval.tasks.essays import essay_text


def _logits(*rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def test_kl_top1_nll_on_hand_computed_distributions():
    p = _logits([0.5, 0.5, 0.0 + 1e-300], [0.7, 0.2, 0.1])
    q = _logits([0.25, 0.75, 1e-300], [0.1, 0.2, 0.7])
    kl = kl_per_token(p, q)
    assert kl[0].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    assert kl[1].item() == pytest.approx(0.7 * math.log(7) + 0.1 * math.log(1 / 7))
    assert kl_per_token(p, p).abs().max().item() < 1e-12
    assert kl_per_token(p + 3.0, q - 1.0) == pytest.approx(kl)  # logits, not probabilities
    assert top1_agreement(p, q) == 0.0 and top1_agreement(p, p) == 1.0
    assert top1_agreement(_logits([0.6, 0.4], [0.3, 0.7]), _logits([0.9, 0.1], [0.8, 0.2])) == 0.5
    nll = nll_per_token(q, torch.tensor([1, 2]))
    assert nll.tolist() == pytest.approx([-math.log(0.75), -math.log(0.7)])
    assert math.exp(nll.mean().item()) == pytest.approx((0.75 * 0.7) ** -0.5)  # perplexity


def test_window_offsets_follow_python_random():
    rng = random.Random(1234)
    assert window_offsets(10_000, 3000, 64, 3, 1234) == [rng.randrange(0, 10_000 - 3064) for _ in range(3)]
    assert window_offsets(3064, 3000, 64, 2, 1234) == [0, 0]
    with pytest.raises(ValueError, match="fewer than"):
        window_offsets(100, 90, 20, 1, 0)


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(len(tok)), tok


def test_full_vs_full_and_resume(tiny, tmp_path):
    model, tok = tiny
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    essays = essay_text()
    (text_dir / "b.txt").write_text(essays[5000:6000])
    (text_dir / "a.txt").write_text(essays[:1000])  # file-name order, not creation order
    config = FidelityConfig(tmp_path, ["full", "snapkv"], [0.5], "tiny", context=160, continuation=12, windows=2,
                            text_dir=str(text_dir), progress=False)
    path = run_fidelity(model, tok, config)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 4
    ids = tok(essays[:1000] + "\n\n" + essays[5000:6000], add_special_tokens=False)["input_ids"]
    for line in lines:
        if line["method"] == "full":
            assert line["kl"] == pytest.approx(0.0, abs=1e-6) and line["top1"] == 1.0
            assert line["keep_fraction"] == 1.0
            # perplexity equals a single dense forward over the window
            window = torch.tensor([ids[line["offset"]: line["offset"] + 172]])
            with torch.no_grad():
                logits = model(window).logits[0, 159:171]
            assert line["nll"] == pytest.approx(nll_per_token(logits, window[0, 160:]).mean().item(), abs=1e-4)
        else:
            assert line["keep_fraction"] == pytest.approx(0.5, abs=0.01)
            assert line["kl"] > 0
    rows = {r["method"]: r for r in summarize(tmp_path)["fidelity"]}
    assert rows["full"]["windows"] == 2 and rows["full"]["kl"] == pytest.approx(0, abs=1e-6)
    expected_ppl = math.exp(sum(x["nll"] for x in lines if x["method"] == "snapkv") / 2)
    assert rows["snapkv"]["ppl"] == pytest.approx(expected_ppl, rel=1e-3)
    # rerun: nothing new; a line killed mid-write is dropped and redone
    text = path.read_text()
    path.write_text(text[: len(text) - 20])
    run_fidelity(model, tok, config)
    again = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(again) == 4 and {(x["window"], x["method"]) for x in again} == {(x["window"], x["method"]) for x in lines}

