"""Runner: prompt encoding, question modes, resume after a kill, sharding, summary, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eval_helpers import save_tiny, tiny_model, tiny_tokenizer

from heterocache.eval.cli import main as eval_main
from heterocache.eval.report import write_summary
from heterocache.eval.results import read_jsonl
from heterocache.eval.runner import RunConfig, parse_shard, run_samples, shard_from_env
from heterocache.eval.tasks import passkey, ruler
from heterocache.eval.tasks.base import Sample, encode_prompt

REPO = Path(__file__).resolve().parents[1]
KEY_FIELDS = ("task", "sample_id", "method", "keep", "question_mode", "model", "settings")


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(len(tok)), tok


def _keys(path: Path) -> list[tuple]:
    return [tuple(line[k] for k in KEY_FIELDS) for line in read_jsonl(path)]


def _sample(**fields) -> Sample:
    base = dict(task="t", sample_id="0", context="Some context. ", question="Question?", answer_prefix=" A:",
                gold=["x"], metric="string_match_part", max_new_tokens=4)
    return Sample(**{**base, **fields})


def test_encode_prompt_chat_split_and_single_bos(tiny):
    _, tok = tiny
    s = _sample()
    context_ids, rest_ids = encode_prompt(tok, s)
    text = tok.apply_chat_template([{"role": "user", "content": s.prompt}], tokenize=False, add_generation_prompt=True)
    assert context_ids + rest_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert (context_ids + rest_ids).count(tok.bos_token_id) == 2  # system-less template: user + assistant headers
    assert context_ids[0] == tok.bos_token_id and context_ids[1] != tok.bos_token_id
    assert tok.decode(context_ids).endswith("Some context. ")
    assert tok.decode(rest_ids).startswith("Question? A:<|im_end|>")
    # RULER: the answer prefix follows the assistant header
    _, rest_ids = encode_prompt(tok, _sample(extra={"answer_after_template": True}))
    assert tok.decode(rest_ids).endswith("<|im_start|>assistant\n A:")
    context_ids, rest_ids = encode_prompt(tok, _sample(chat=False))
    assert tok.decode(context_ids + rest_ids) == s.prompt


def test_decode_mode_equals_prefill_mode_for_full_kv(tiny, tmp_path):
    model, tok = tiny
    samples = list(passkey.load(tokenizer=tok, lengths=[400], samples=1))
    for mode in ("prefill", "decode"):
        run_samples(model, tok, samples, RunConfig(tmp_path, ["full"], [0.5], "passkey", "tiny", mode, progress=False))
    lines = read_jsonl(tmp_path / "results.jsonl")
    by_mode = {m: [x["prediction"] for x in lines if x["question_mode"] == m] for m in ("prefill", "decode")}
    assert len(by_mode["prefill"]) == 3 and by_mode["prefill"] == by_mode["decode"]
    assert all(x["new_tokens"] == 12 and x["prompt_tokens"] > x["context_tokens"] for x in lines)


def test_method_variants_run_beside_each_other(tiny, tmp_path):
    """``METHOD@VARIANT`` labels: the same method twice in one run, each with its own options, on the same
    prompts (one shared prefill); the lines carry the labels, the caches their options."""
    from heterocache.eval.arguments import method_options

    model, tok = tiny
    samples = list(passkey.load(tokenizer=tok, lengths=[400], samples=1, depths=[0.5]))
    methods = ["heterocache", "heterocache@sketch"]  # (auto: page means on this head_dim-16 model)
    options = method_options(["heterocache@sketch.index=sketch", "sinks=0", "window=1"], methods)
    assert options == {"heterocache": {"sinks": 0, "window": 1},
                       "heterocache@sketch": {"index": "sketch", "sinks": 0, "window": 1}}
    run_samples(model, tok, samples, RunConfig(tmp_path, methods, [0.5], "passkey", "tiny", "decode",
                                               method_options=options, progress=False))
    lines = {x["method"]: x["cache"] for x in read_jsonl(tmp_path / "results.jsonl")}
    assert set(lines) == {"heterocache", "heterocache@sketch"}
    assert lines["heterocache"]["method"] == lines["heterocache@sketch"]["method"] == "heterocache"
    assert 0 < lines["heterocache"]["summary_bytes"] < lines["heterocache@sketch"]["summary_bytes"]  # means < sketch


def test_resume_after_truncated_line_and_summary(tiny, tmp_path):
    model, tok = tiny
    samples = list(ruler.load(tokenizer=tok, tasks=["niah_single_1"], lengths=[1200], samples=3))
    config = RunConfig(tmp_path, ["full", "streamingllm"], [0.5, 0.25], "ruler", "tiny", max_new_tokens=6,
                       progress=False)
    path = run_samples(model, tok, samples, config)
    full = path.read_text()
    assert len(full.splitlines()) == 3 * 3
    # simulate a kill mid-write: keep 4 lines and half of the 5th
    lines = full.splitlines(keepends=True)
    path.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    run_samples(model, tok, samples, config)
    write_summary(tmp_path)  # the CLI's job (heterocache eval), not the runner's
    keys = _keys(path)
    assert len(keys) == 9 and len(set(keys)) == 9
    assert [json.loads(x)["prediction"] for x in path.read_text().splitlines()[:4]] == \
        [json.loads(x)["prediction"] for x in lines[:4]]
    summary = json.loads((tmp_path / "summary.json").read_text())["tasks"]
    assert {(r["method"], r["keep"]) for r in summary} == {("full", 1.0), ("streamingllm", 0.5), ("streamingllm", 0.25)}
    results = read_jsonl(path)
    for row in summary:
        mine = [x for x in results if (x["method"], x["keep"]) == (row["method"], row["keep"])]
        assert row["n"] == 3
        assert row["score"] == pytest.approx(round(100 * sum(x["score"] for x in mine) / 3, 2))
        assert row["keep_measured"] == pytest.approx(sum(x["keep_fraction"] for x in mine) / 3, abs=1e-4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny_model"))


def _cli(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "passkey", "--model", str(tiny_dir), "--methods", "full,snapkv", "--keep", "0.5",
            "--out", str(out), "--lengths", "1200", "--samples", "2", "--no-progress",
            "--dtype", "float32", *extra]


# Runs the eval CLI; after PAUSE_AFTER result lines are durable it creates PAUSE_FILE and blocks, so
# the test can kill it at a known point (a barrier, not a timing race).
PAUSING_EVAL = """
import os, sys, time
from heterocache.eval import results
from heterocache.eval.cli import main

append, written = results.ResultLog.append, []

def append_then_pause(self, line):
    append(self, line)
    written.append(line)
    if len(written) == int(os.environ["PAUSE_AFTER"]):
        open(os.environ["PAUSE_FILE"], "w").close()
        while True:
            time.sleep(60)

results.ResultLog.append = append_then_pause
sys.exit(main(sys.argv[1:]))
"""


def _env(**extra: str) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1", **extra}


def test_killed_shard_resumes_and_two_shards_equal_the_unsharded_run(tiny_dir, tmp_path):
    """Two ``--shard i/2`` subprocesses; shard 0 is SIGKILLed after 2 results and resumed in-process."""
    out = tmp_path / "run"
    shard0 = out / "results.shard0of2.jsonl"
    paused = tmp_path / "shard0.paused"
    shards = [subprocess.Popen([sys.executable, "-c", PAUSING_EVAL, *_cli(tiny_dir, out, "--shard", "0/2")],
                               cwd=REPO, env=_env(PAUSE_AFTER="2", PAUSE_FILE=str(paused)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
              subprocess.Popen([sys.executable, "-m", "heterocache.eval.cli", *_cli(tiny_dir, out, "--shard", "1/2")],
                               cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    deadline = time.time() + 300
    while not paused.exists() and shards[0].poll() is None and time.time() < deadline:
        time.sleep(0.05)  # waiting for the barrier; shard 0 cannot move past it
    if not paused.exists():
        shards[0].kill()
        pytest.fail(f"shard 0 never reached 2 results: {shards[0].communicate(timeout=60)[1]}")
    shards[0].send_signal(signal.SIGKILL)
    shards[0].wait(timeout=60)
    assert shards[0].returncode == -signal.SIGKILL, "shard 0 finished before it could be killed"
    _, err = shards[1].communicate(timeout=180)
    assert shards[1].returncode == 0, err
    killed_at = len(read_jsonl(shard0))
    assert 2 <= killed_at < 6

    from heterocache.models import load_model

    model, tok = load_model(str(tiny_dir))
    samples = list(passkey.load(tokenizer=tok, lengths=[1200], samples=2))
    config = RunConfig(out, ["full", "snapkv"], [0.5], "passkey", str(tiny_dir), shard=(0, 2), progress=False)
    run_samples(model, tok, samples, config)  # resume shard 0
    write_summary(out)  # the CLI's job (heterocache eval), not the runner's
    assert len(_keys(shard0)) == 6 and len(set(_keys(shard0))) == 6
    whole = tmp_path / "whole"
    run_samples(model, tok, samples, RunConfig(whole, ["full", "snapkv"], [0.5], "passkey", str(tiny_dir),
                                               progress=False))

    def table(paths):
        return {tuple(x[k] for k in KEY_FIELDS): (x["prediction"], x["score"]) for p in paths for x in read_jsonl(p)}

    sharded = table(sorted(out.glob("results.shard*of2.jsonl")))
    assert len(sharded) == 12 and sharded == table([whole / "results.jsonl"])
    rows = json.loads((out / "summary.json").read_text())["tasks"]
    assert sum(r["n"] for r in rows) == 12  # the summary merges both shards


def test_shard_arguments_and_accelerate_env(monkeypatch):
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert shard_from_env() == (1, 2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert shard_from_env() is None


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "nosuch"], "valid suites: fidelity, "),
    (["eval", "passkey", "--methods", "full,bogus"], "available methods: full"),
    (["eval", "ruler", "--tasks", "niah_single_1,bogus"], "valid tasks: niah_single_1"),
    (["eval", "longbench"], "pass --data DIR"),
    (["eval", "longbench", "--data", "/nonexistent/dir"], "is not a directory"),
    (["eval", "passkey", "--keep", "0"], "keep"),
    (["eval", "passkey", "--question-mode", "sideways"], "prefill, decode"),
    (["eval", "passkey", "--shard", "2/2"], "--shard"),
    (["eval", "passkey", "--option", "nosuch=1"], "no selected method"),
    (["eval", "niah", "--samples", "3"], "do not apply to suite 'niah'"),
    (["eval", "passkey", "--methods", "snapkv,snapkv"], "listed twice"),
    (["eval", "passkey", "--methods", "nosuch@x"], "unknown method"),
    (["eval", "passkey", "--methods", "snapkv@w", "--option", "snapkv@w.nosuch=1"], "nosuch"),
])
def test_bad_input_errors(argv, message, capsys):
    assert eval_main(argv) == 2
    assert message in capsys.readouterr().err


def test_report_of_missing_dir(capsys, tmp_path):
    assert eval_main(["report", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
