"""``heterocache bench``: end to end on a tiny random Llama, result schema, derived numbers, presets."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import TINY_BENCH_ARCHITECTURE

from heterocache.bench import models as bench_models
from heterocache.bench.cli import parse_contexts
from heterocache.bench.models import architecture_config, bandwidth_bound, meta_model, weight_read_bytes
from heterocache.bench.report import derive
from heterocache.cli import main
from heterocache.eval.arguments import method_options
from heterocache.eval.search import largest_fitting
from heterocache.models import model_geometry

LINE_TYPES = {
    "kind": str, "model": str, "device": str, "dtype": str, "threads": int, "method": str, "keep": float, "options": dict,
    "context": int, "batch": int, "steps": int, "warmup": int, "schedule": str, "prefill_s": float, "decode_ms": float,
    "decode_ms_steps": list, "tokens_per_s": float, "peak_memory_bytes": int, "peak_memory_note": str,
    "cache": dict, "weight_bytes": int, "kv_full_bytes": int, "read_bytes_per_token": float,
    "weight_resident_bytes": int, "decode_slow_tier_bytes": dict, "critical_bytes_per_token": float,
    "prefetched_bytes_per_token": float, "critical_share_of_kv": float, "prefetched_share_of_kv": float,
    "device_kv_read_bytes": float, "device_metadata_bytes": int,
}
ROW_TYPES = {"speedup_vs_full": float, "bound_speedup": float, "fraction_of_bound": float}


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    """``--model-config tiny``: the test-only architecture (tests/eval_helpers.py)."""
    monkeypatch.setitem(bench_models.ARCHITECTURES, "tiny", TINY_BENCH_ARCHITECTURE)


def _tiny_weight_bytes() -> int:
    """Hand count for the ``tiny`` preset (fp32): the untied embedding table is not read per token."""
    hidden, inter, vocab, kv_dim, layers = 64, 128, 256, 2 * 16, 2
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter + 2 * hidden
    return 4 * (layers * per_layer + hidden + vocab * hidden)


def test_bench_cli_end_to_end_and_resume(tmp_path, capsys):
    # the paper's mode needs a head profile, which a random-weight model has not (the default mode needs none)
    argv = ["bench", "--model-config", "tiny", "--context", "48,0.096k", "--methods", "snapkv,streamingllm,heterocache",
            "--keep", "0.5", "--steps", "3", "--warmup", "1", "--max-batch", "--option", "heterocache.retrieval=async",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "skipping heterocache" in printed and "profile" in printed
    assert "--max-batch is not applicable on CPU" in printed
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted((x["method"], x["context"]) for x in lines) == sorted(
        (m, c) for m in ("full", "snapkv", "streamingllm") for c in (48, 96))
    for line in lines:
        for key, kind in LINE_TYPES.items():
            assert isinstance(line[key], kind), (key, line[key])
        assert len(line["decode_ms_steps"]) == 3 and line["decode_ms"] == sorted(line["decode_ms_steps"])[1]
        assert line["weight_bytes"] == _tiny_weight_bytes()
        assert line["kv_full_bytes"] == 2 * 2 * 2 * 16 * 4 * line["context"]  # K+V, layers, KV heads, D, fp32
        r = line["cache"]["keep_fraction"]
        assert r == pytest.approx(1.0 if line["method"] == "full" else 0.5, abs=0.02)
        assert line["read_bytes_per_token"] == pytest.approx(line["weight_bytes"] + r * line["kv_full_bytes"])
        assert line["peak_memory_bytes"] == line["cache"]["device_bytes"] > 0  # CPU: the cache's bytes
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["max_batch"] == [] and len(summary["rows"]) == 6
    for row in summary["rows"]:
        for key, kind in ROW_TYPES.items():
            assert isinstance(row[key], kind), (key, row[key])
        if row["method"] == "full":
            assert row["speedup_vs_full"] == 1.0 and row["bound_speedup"] == 1.0  # same numbers by construction
    table = (tmp_path / "table.md").read_text()
    assert table.count("| snapkv | 0.5 |") == 2 and "bound" in table
    assert (tmp_path / "decode_ms.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 0  # rerun: every line is done, nothing is measured again
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 6
    assert "ms/token  kept" not in capsys.readouterr().out


def test_interleaved_schedule_pairs_with_its_own_full(tmp_path):
    argv = ["bench", "--model-config", "tiny", "--context", "40", "--methods", "streamingllm", "--keep", "0.25",
            "--steps", "2", "--warmup", "0", "--out", str(tmp_path)]
    assert main(argv) == 0 and main([*argv, "--interleave"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert sorted((r["schedule"], r["method"]) for r in rows) == [
        ("interleaved", "full"), ("interleaved", "streamingllm"), ("sequential", "full"), ("sequential", "streamingllm")]
    for row in rows:
        ref = next(r for r in rows if r["method"] == "full" and r["schedule"] == row["schedule"])
        assert row["speedup_vs_full"] == ref["decode_ms"] / row["decode_ms"]
    assert main([*argv, "--interleave", "--keep", "0.25,0.5"]) == 0  # a new keep re-measures full beside it
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len([r for r in rows if r["schedule"] == "interleaved"]) == 3


def test_derived_speedup_and_bound_on_hand_numbers():
    assert bandwidth_bound(100, 300, 0.25) == pytest.approx(400 / 175)
    assert bandwidth_bound(100, 300, 1.0) == 1.0
    base = {"kind": "decode", "model": "m", "device": "cpu", "dtype": "float32", "context": 10, "batch": 1,
            "steps": 20, "warmup": 4, "weight_bytes": 100, "kv_full_bytes": 300}
    rows = derive([{**base, "method": "full", "keep": 1.0, "decode_ms": 10.0, "cache": {"keep_fraction": 1.0}},
                   {**base, "method": "snapkv", "keep": 0.25, "decode_ms": 5.0, "cache": {"keep_fraction": 0.25}},
                   {**base, "method": "snapkv", "keep": 0.25, "decode_ms": 5.0, "batch": 2,
                    "cache": {"keep_fraction": 0.25}}])
    full, snap, unpaired = rows
    assert full["speedup_vs_full"] == 1.0 and full["fraction_of_gain"] is None
    assert snap["speedup_vs_full"] == 2.0
    assert snap["bound_speedup"] == pytest.approx(400 / 175)
    assert snap["fraction_of_bound"] == pytest.approx(2.0 * 175 / 400)
    assert snap["fraction_of_gain"] == pytest.approx(1.0 / (400 / 175 - 1))
    assert unpaired["speedup_vs_full"] is None  # no full line for batch 2


def test_natural_limit_and_left_padded_batch_rows(tmp_path):
    argv = ["bench", "--model-config", "tiny", "--context", "40", "--methods", "snapkv", "--keep", "0.5,0.25",
            "--batch", "2", "--length-spread", "0.5", "--steps", "2", "--warmup", "1", "--interleave",
            "--natural-limit", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    natural = {r["keep"]: r for r in rows if r.get("natural_limit")}
    assert sorted((k, r["context"], r["natural_limit"]) for k, r in natural.items()) == [(0.25, 10, 40), (0.5, 20, 40)]
    full = next(r for r in rows if r["method"] == "full" and not r.get("natural_limit"))
    assert full["prompt_lengths"] == [40, 20] and full["length_spread"] == 0.5
    assert full["cache"]["prompt_tokens"] == 60  # left padding is not stored
    for row in rows:
        if row["method"] == "snapkv":
            assert row["vs_natural_limit"] == row["decode_ms"] / natural[row["keep"]]["decode_ms"]
        if row.get("natural_limit"):  # paired with the full line of the context it stands for
            assert row["speedup_vs_full"] == full["decode_ms"] / row["decode_ms"]
            assert row["prompt_lengths"] == [row["context"], row["context"] // 2]
        assert row["time_shares"] == {}
    assert "full (natural limit)" in (tmp_path / "table.md").read_text()


def test_time_counters_are_reported_as_shares():
    from heterocache.bench.report import markdown_table

    base = {"kind": "decode", "model": "m", "device": "cpu", "dtype": "float32", "context": 10, "batch": 1,
            "steps": 20, "warmup": 4, "weight_bytes": 100, "kv_full_bytes": 300, "prefill_s": 1.0,
            "tokens_per_s": 1.0, "read_bytes_per_token": 1.0, "peak_memory_bytes": 1, "peak_memory_note": "n"}
    cache = {"keep_fraction": 0.25, "device_bytes": 1, "host_bytes": 0}
    rows = derive([{**base, "method": "full", "keep": 1.0, "decode_ms": 10.0, "cache": {**cache, "keep_fraction": 1}},
                   {**base, "method": "heterocache", "keep": 0.25, "decode_ms": 5.0,
                    "cache": {**cache, "retrieval_checked": 40, "retrieval_skipped": 30},
                    "time_shares": {"retrieval_check_s": 0.125}, "prefill_time_counters": {"retrieval_layout_s": 0.08}}])
    table = markdown_table(rows)
    assert "retrieval_check_s 12.5%" in table and "refills skipped 75%" in table
    assert "in the prefill: retrieval_layout_s 0.080 s" in table


def test_decoder_keeps_what_the_prefill_spent():
    """The bench's decode shares count only what the decode steps added to a method's time counters."""
    from heterocache.bench.run import _Decoder

    class Feeder:
        def stats(self):
            return {"retrieval_layout_s": 0.08, "retrieval_select_s": 0.0, "keep_fraction": 0.25, "exact": True}

    decoder = _Decoder(Feeder(), torch.zeros(1, 1, dtype=torch.long), None)
    assert decoder.at_prefill == {"retrieval_layout_s": 0.08, "retrieval_select_s": 0.0}


def test_llama_8b_preset_builds_on_meta_without_memory():
    config = architecture_config("llama-3.1-8b", layers=1)
    model = meta_model(config, torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model_geometry(model) == {"n_layers": 1, "n_heads": 32, "n_kv_heads": 8, "head_dim": 128,
                                     "max_positions": 131072}
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.weight.shape == (4096, 4096) and attn.k_proj.weight.shape == (1024, 4096)
    assert mlp.gate_proj.weight.shape == (14336, 4096) and model.lm_head.weight.shape == (128256, 4096)
    assert config.rope_parameters["rope_type"] == "llama3" and model.dtype == torch.bfloat16
    per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    assert weight_read_bytes(model) == 2 * (per_layer + 4096 + 128256 * 4096)
    qwen = meta_model(architecture_config("qwen2.5-7b", layers=2), torch.bfloat16)
    assert model_geometry(qwen)["n_kv_heads"] == 4 and model_geometry(qwen)["head_dim"] == 128
    assert qwen.model.layers[1].self_attn.k_proj.weight.shape == (512, 3584)
    assert qwen.model.layers[1].self_attn.k_proj.bias is not None


def test_argument_parsing_and_errors(capsys, tmp_path):
    assert parse_contexts("2k,4k,7.5k,900") == [2000, 4000, 7500, 900]
    for bad in ("2x", "0", "1.5", ""):
        with pytest.raises(ValueError, match="--context"):
            parse_contexts(bad)
    # one option syntax for eval, bench and generate: --option [METHOD.]NAME=VALUE (was METHOD:NAME=VALUE here)
    profile = tmp_path / "p.json"
    profile.write_text("{}")
    assert method_options([f"heterocache.profile={profile}", "heterocache.retrieval=async", "heterocache.steps=3"],
                          ["heterocache"]) == {"heterocache": {"profile": str(profile), "retrieval": "async", "steps": 3}}
    with pytest.raises(ValueError, match="no selected method"):
        method_options(["h2o.window=3"], ["snapkv"])
    with pytest.raises(SystemExit, match="unknown"):
        main(["bench", "--model-config", "tiny", "--methods", "nope"])
    with pytest.raises(SystemExit):
        main(["bench", "--model-config", "gpt-5"])
    assert "--model-config" in capsys.readouterr().err


def test_largest_fitting_doubles_then_bisects():
    calls = []

    def fits_under(limit):
        def fits(batch):
            calls.append(batch)
            return batch <= limit
        return fits

    assert largest_fitting(fits_under(37), 256) == 37
    assert len(calls) <= 6 + 6 + 1  # 1..64 doubling, then bisection of (32, 64)
    assert largest_fitting(fits_under(1000), 256) == 256
    assert largest_fitting(fits_under(1000), 100) == 100
    assert largest_fitting(fits_under(0), 256) == 0
    assert largest_fitting(fits_under(1), 256) == 1


def test_resume_after_a_line_cut_mid_write(tmp_path):
    """A bench killed while writing its last result line resumes: the cut line is dropped and redone."""
    argv = ["bench", "--model-config", "tiny", "--context", "32", "--methods", "streamingllm", "--keep", "0.5",
            "--steps", "2", "--warmup", "0", "--out", str(tmp_path)]
    assert main(argv) == 0
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 2
    path.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed mid-write
    assert main(argv) == 0
    again = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["method"] for x in again] == ["full", "streamingllm"]
    assert again[0] == json.loads(lines[0])  # the complete line is kept, not measured again


def test_essay_prompts_and_random_ids():
    """``--prompt essays`` (the default with --model): row i is the PEERS essays' tokens from i * context on;
    ``random`` ids otherwise; a model without a tokenizer refuses essays with the flag to use."""
    from conftest import tiny_model
    from eval_helpers import tiny_tokenizer

    from heterocache.bench.run import Bench
    from heterocache.eval.fidelity import PEERS_SEPARATOR
    from heterocache.eval.tasks.essays import essay_text

    model = tiny_model("llama", vocab=300)
    tok = tiny_tokenizer()
    model.bench_tokenizer = tok
    ids, mask = Bench(model, "tiny", prompt="essays").prompt(50, 2)
    tokens = tok(essay_text(None, PEERS_SEPARATOR), add_special_tokens=False)["input_ids"]
    assert mask is None and ids[0].tolist() == tokens[:50] and ids[1].tolist() == tokens[50:100]
    random_ids, _ = Bench(model, "tiny", prompt="random").prompt(50, 2)
    assert random_ids[0].tolist() != tokens[:50]
    del model.bench_tokenizer
    with pytest.raises(ValueError, match="--prompt random"):
        Bench(model, "tiny", prompt="essays")
