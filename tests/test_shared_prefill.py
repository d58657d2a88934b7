"""Shared prefill in eval, fidelity and the bench: the same results as one prefill per job (eval/grid.py)."""

from __future__ import annotations

import json

import pytest
from eval_helpers import TINY_BENCH_ARCHITECTURE, tiny_model, tiny_tokenizer

from heterocache.bench import models as bench_models
from heterocache.cli import main
from heterocache.eval.fidelity import FidelityConfig, run_fidelity
from heterocache.eval.results import read_jsonl
from heterocache.eval.runner import RunConfig, run_samples
from heterocache.eval.tasks import passkey
from heterocache.eval.tasks.essays import essay_text

METHODS, KEEPS = ["full", "snapkv", "h2o", "heterocache"], [0.5, 0.25]
JOBS = 1 + 3 * len(KEEPS)  # FullKV once, every other method at every keep
OPTIONS = {"heterocache": {"sinks": 0, "window": 1}}
RESULT_FIELDS = ("prediction", "score", "keep_fraction", "new_tokens", "decode_steps", "prompt_tokens")


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(len(tok)), tok


def _by_key(lines: list[dict], *fields: str) -> dict[tuple, dict]:
    return {tuple(line[f] for f in fields): line for line in lines}


def _cache(line: dict) -> dict:
    return {k: v for k, v in line["cache"].items() if not k.endswith("_s")}


def _run(model, tok, samples, out, mode, shared, methods=METHODS):
    config = RunConfig(out, methods, KEEPS, "passkey", "tiny", mode, OPTIONS, progress=False, shared_prefill=shared)
    return read_jsonl(run_samples(model, tok, samples, config))


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_runner_shared_prefill_gives_the_per_job_results(tiny, tmp_path, mode):
    model, tok = tiny
    samples = list(passkey.load(tokenizer=tok, lengths=[400], depths=[0.2, 0.7], samples=1))
    alone = _by_key(_run(model, tok, samples, tmp_path / "alone", mode, False), "sample_id", "method", "keep")
    path = tmp_path / "shared"
    lines = _run(model, tok, samples, path, mode, True)
    shared = _by_key(lines, "sample_id", "method", "keep")
    assert len(shared) == len(alone) == 2 * JOBS and shared.keys() == alone.keys()
    hetero = [line for line in lines if line["method"] == "heterocache"]
    assert all(line["cache"]["host_bytes"] > 0 for line in hetero)  # it served the prompt with retrieval
    for key, line in shared.items():
        for field in RESULT_FIELDS:
            assert line[field] == alone[key][field], (key, field)
        assert _cache(line) == _cache(alone[key]), key
        assert line["shared_prefill_jobs"] == JOBS and "shared_prefill_jobs" not in alone[key]
        assert 0 < line["compress_s"] <= line["prefill_s"] <= line["shared_prefill_s"] + 1e-4
        assert alone[key]["compress_s"] > 0
    for sample in samples:  # every job of a sample: the same dense forward (its own compress_s added back)
        mine = [line for line in lines if line["sample_id"] == sample.sample_id]
        dense = [line["prefill_s"] - line["compress_s"] for line in mine]
        assert max(dense) - min(dense) < 1e-3
        assert len({line["shared_prefill_s"] for line in mine}) == 1

    # resume: a run killed after 3 lines of the first sample (the 4th cut mid-write) redoes only the
    # missing jobs, sharing one forward among them, and gets the same results
    text = (path / "results.jsonl").read_text().splitlines(keepends=True)
    (path / "results.jsonl").write_text("".join(text[:3]) + text[3][:40])
    resumed = _by_key(_run(model, tok, samples, path, mode, True), "sample_id", "method", "keep")
    assert resumed.keys() == alone.keys()
    for key, line in resumed.items():
        assert all(line[field] == alone[key][field] for field in RESULT_FIELDS), key
    first = samples[0].sample_id
    assert sorted(line["shared_prefill_jobs"] for key, line in resumed.items() if key[0] == first) == \
        [JOBS - 3] * (JOBS - 3) + [JOBS] * 3


def test_sequential_turns_share_the_prefill(tiny, tmp_path):
    model, tok = tiny
    samples = list(passkey.load(tokenizer=tok, lengths=[400], samples=1, sequential=2, max_new_tokens=4))
    methods = ["full", "snapkv", "heterocache"]
    alone = _by_key(_run(model, tok, samples, tmp_path / "a", "decode", False, methods), "method", "keep")
    shared = _by_key(_run(model, tok, samples, tmp_path / "b", "decode", True, methods), "method", "keep")
    assert shared.keys() == alone.keys() and len(shared) == 1 + 2 * len(KEEPS)
    for key, line in shared.items():
        assert line["turns"] == alone[key]["turns"] and line["score"] == alone[key]["score"]
        assert line["shared_prefill_jobs"] == len(shared) and "prefill_s" not in line
        assert line["total_s"] > 0


def test_fidelity_shares_the_prefill_with_the_reference(tiny, tmp_path):
    model, tok = tiny
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    (text_dir / "a.txt").write_text(essay_text()[:3000])
    runs = {}
    for shared in (False, True):
        config = FidelityConfig(tmp_path / str(shared), METHODS, KEEPS, "tiny", context=300, continuation=12,
                                windows=2, text_dir=str(text_dir), method_options=OPTIONS, progress=False,
                                shared_prefill=shared)
        runs[shared] = _by_key(read_jsonl(run_fidelity(model, tok, config)), "window", "method", "keep")
    assert runs[True].keys() == runs[False].keys() and len(runs[True]) == 2 * JOBS
    for key, line in runs[True].items():
        alone = runs[False][key]
        for field in ("kl", "top1", "nll", "ppl", "keep_fraction", "device_bytes", "host_bytes"):
            assert line.get(field) == alone.get(field), (key, field)
        assert line["shared_prefill_jobs"] == JOBS + 1  # the FullKV reference shares the forward
        if key[1] == "full":
            assert line["kl"] == pytest.approx(0.0, abs=1e-9) and line["top1"] == 1.0


def test_interleaved_bench_shares_the_prefill(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench_models.ARCHITECTURES, "tiny", TINY_BENCH_ARCHITECTURE)
    argv = ["bench", "--model-config", "tiny", "--context", "64", "--methods", "snapkv,h2o", "--keep", "0.5,0.25",
            "--steps", "2", "--warmup", "0", "--interleave", "--natural-limit"]
    rows = {}
    for flag in ([], ["--no-shared-prefill"]):
        out = tmp_path / (flag[0] if flag else "shared")
        assert main([*argv, *flag, "--out", str(out)]) == 0
        lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
        rows[bool(flag)] = _by_key(lines, "method", "keep", "context")
    shared, alone = rows[False], rows[True]
    assert shared.keys() == alone.keys() and len(shared) == 1 + 4 + 2  # full, 2 x 2 methods, 2 natural limits
    for key, line in shared.items():
        assert _cache(line) == _cache(alone[key]) and "shared_prefill_jobs" not in alone[key]
        if key[2] == 64:  # the context prompt: one forward for the 5 caches
            assert line["shared_prefill_jobs"] == 5 and line["compress_s"] == line["cache"]["compress_s"]
            assert line["prefill_s"] <= line["shared_prefill_s"] + 1e-4
        else:  # the natural limit's shorter prompts prefill alone
            assert "shared_prefill_jobs" not in line
    assert "5 caches)" in (tmp_path / "shared" / "table.md").read_text()


def test_peers_prefill_alone_after_the_shared_jobs(tiny, tmp_path):
    pytest.importorskip("kvpress", reason="kvpress not installed (.venv-peers: make test-peers)")
    model, tok = tiny
    samples = list(passkey.load(tokenizer=tok, lengths=[400], depths=[0.5], samples=1))
    methods = ["full", "snapkv", "kvpress:snapkv"]
    runs = {}
    for shared in (False, True):
        config = RunConfig(tmp_path / str(shared), methods, [0.5], "passkey", "tiny", "decode", progress=False,
                           shared_prefill=shared)
        runs[shared] = read_jsonl(run_samples(model, tok, samples, config))
    assert [line["method"] for line in runs[True]] == ["full", "snapkv", "kvpress:snapkv"]
    alone = _by_key(runs[False], "method", "keep")
    for line in runs[True]:
        key = (line["method"], line["keep"])
        assert all(line[field] == alone[key][field] for field in RESULT_FIELDS), key
        assert line.get("shared_prefill_jobs") == (None if line["method"].startswith("kvpress:") else 2)
