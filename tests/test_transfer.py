"""Slow-tier transfer accounting in ``heterocache bench`` and the projected GPU decode step
(heterocache/bench/roofline.py, bench/project.py): hand-computed roofline cases, the byte split over
the timed decode steps through the real command path, the projection without running, bad flags."""

from __future__ import annotations

import json

import pytest
from eval_helpers import TINY_BENCH_ARCHITECTURE

from heterocache.bench import models as bench_models
from heterocache.bench import project as bench_project
from heterocache.bench import run as bench_run
from heterocache.bench.roofline import GPUS, StepBytes, full_step_time, gpu, largest_batch, step_time
from heterocache.bench.run import transfer_fields
from heterocache.cli import main

H200 = GPUS["h200"]


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    monkeypatch.setitem(bench_models.ARCHITECTURES, "tiny", TINY_BENCH_ARCHITECTURE)


def test_roofline_on_a_hand_computed_step():
    """W = 16 GB, KV = 17.2 GB, r = 0.1, critical 0.1% of the KV, H200 (4.8 TB/s HBM, 55 GB/s link):
    HBM (16 + 1.72) GB / 4.8 TB/s = 3.691667 ms, link 17.2 MB / 55 GB/s = 0.312727 ms, step 4.004394 ms;
    FullKV 33.2 GB / 4.8 TB/s = 6.916667 ms: 1.727269x against a bound of 33.2 / 17.72 = 1.873589x (92.19%)."""
    w, kv = 16e9, 17.2e9
    time = step_time(StepBytes(weights=w, device_kv=0.1 * kv, critical=0.001 * kv), H200)
    assert time.hbm_s == pytest.approx(3.691667e-3, rel=1e-6)
    assert time.critical_s == pytest.approx(0.3127273e-3, rel=1e-6)
    assert time.prefetch_excess_s == 0
    assert time.total_s == pytest.approx(4.004394e-3, rel=1e-6)
    assert full_step_time(w, kv, H200) == pytest.approx(6.916667e-3, rel=1e-6)
    work = bench_project.Workload("m", 0.1, 131072, kv, w, w, bench_project.Shares(0.1, 0.1, critical=0.001))
    row = bench_project.project(work, H200, 1)
    assert row["step_ms"] == pytest.approx(4.004394, rel=1e-6)
    assert row["speedup_vs_full"] == pytest.approx(1.727269, rel=1e-6)
    assert row["bound_speedup"] == pytest.approx(1.873589, rel=1e-6)
    assert row["of_bound"] == pytest.approx(0.921904, rel=1e-5)
    # the index / metadata is read over HBM like the held tokens
    with_index = step_time(StepBytes(weights=w, device_kv=0.1 * kv, metadata=0.02 * kv), H200)
    assert with_index.hbm_s == pytest.approx((16e9 + 1.72e9 + 0.344e9) / 4.8e12)


def test_prefetched_bytes_count_only_above_the_hbm_time():
    """HBM time 3.691667 ms: 100 MB prefetched (1.818 ms over 55 GB/s) is hidden; 300 MB (5.4545 ms) leaves
    5.454545 - 3.691667 = 1.762879 ms; critical bytes never overlap."""
    base = dict(weights=16e9, device_kv=1.72e9)
    hidden = step_time(StepBytes(**base, prefetched=100e6), H200)
    assert hidden.prefetch_excess_s == 0 and hidden.total_s == pytest.approx(3.691667e-3, rel=1e-6)
    over = step_time(StepBytes(**base, prefetched=300e6), H200)
    assert over.prefetch_excess_s == pytest.approx(1.762879e-3, rel=1e-6)
    assert over.total_s == pytest.approx(5.454545e-3, rel=1e-6)
    both = step_time(StepBytes(**base, critical=55e6, prefetched=300e6), H200)
    assert both.critical_s == pytest.approx(1e-3) and both.total_s == pytest.approx(6.454545e-3, rel=1e-6)


def test_largest_fullkv_batch_and_presets():
    assert largest_batch(16e9, 17.2e9, 141e9) == 7  # 16 + 7 * 17.2 = 136.4 <= 141 < 153.6
    assert largest_batch(16e9, 17.2e9 / 4, 141e9) == 29  # 32K-ish rows: 16 + 29 * 4.3 = 140.7
    assert largest_batch(1, 2, 7) == 3  # an exact fit counts
    assert largest_batch(8, 2, 7) == 0  # the weights alone do not fit
    assert (GPUS["h100"].hbm_bytes_per_s, GPUS["h100"].link_bytes_per_s, GPUS["h100"].capacity_bytes) == (
        3.35e12, 55e9, 80e9)
    assert (H200.hbm_bytes_per_s, H200.capacity_bytes) == (4.8e12, 141e9)
    assert (GPUS["a100"].hbm_bytes_per_s, GPUS["a100"].link_bytes_per_s) == (2.039e12, 25e9)
    slow = gpu("h200", link_gbps=25, hbm_gb=100)
    assert slow.link_bytes_per_s == 25e9 and slow.capacity_bytes == 100e9 and slow.hbm_bytes_per_s == 4.8e12
    assert "link 25 GB/s" in slow.name and gpu("h200") == H200
    with pytest.raises(ValueError, match="unknown GPU"):
        gpu("h900")


def test_transfer_fields_count_the_timed_steps_only():
    """Bytes moved in the prefill and the warm-up are left out; an unsplit remainder counts as critical."""
    names = bench_run.BYTE_COUNTERS
    at_prefill = dict(zip(names, (100, 100, 0)))
    at_timed = dict(zip(names, (700, 500, 200)))
    stats = {"retrieval_bytes": 1900, "retrieval_critical_bytes": 1300, "retrieval_prefetched_bytes": 400,
             "keep_fraction": 0.2, "device_bytes": 5000, "device_used_bytes": 3000, "device_overhead_bytes": 500}
    out = transfer_fields(stats, at_prefill, at_timed, steps=4, batch=2, full_kv=10_000)
    # timed: 1200 bytes, 800 critical + 200 prefetched + 200 unsplit (counted critical)
    assert out["decode_slow_tier_bytes"] == {"critical": 1000, "prefetched": 200, "steps": 4}
    assert out["critical_bytes_per_token"] == 1000 / 8 and out["prefetched_bytes_per_token"] == 200 / 8
    assert out["critical_share_of_kv"] == 1000 / 4 / 10_000 and out["prefetched_share_of_kv"] == 200 / 4 / 10_000
    assert out["device_kv_read_bytes"] == 2000 and out["device_metadata_bytes"] == 1500  # 5000 - 3000 - 500
    assert out["prefill_slow_tier_bytes"] == 100
    peer = {"keep_fraction": 0.25, "stored_fraction": 1.0, "device_bytes": 40, "device_used_bytes": 40}
    none = dict.fromkeys(names, 0)
    out = transfer_fields(peer, none, none, steps=2, batch=1, full_kv=40)
    assert out["critical_bytes_per_token"] == 0 and out["device_kv_read_bytes"] == 40  # masks: reads all
    assert out["device_metadata_bytes"] == 0 and "prefill_slow_tier_bytes" not in out


def test_bench_splits_slow_tier_bytes_over_the_timed_steps(tmp_path, capsys):
    """The real command path on the tiny model: HeteroCache (dynamic retrieval at 256 tokens) counts
    critical bytes and no prefetched ones, over the timed steps only; FullKV and SnapKV move nothing; the
    measured lines are projected; their directory feeds a projection without running."""
    out = tmp_path / "b"
    argv = ["bench", "--model-config", "tiny", "--context", "256", "--methods", "snapkv,heterocache", "--keep", "0.25",
            "--steps", "3", "--warmup", "1", "--interleave", "--project", "h200,a100", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    lines = {x["method"]: x for x in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert sorted(lines) == ["full", "heterocache", "snapkv"]
    hc = lines["heterocache"]
    moved = hc["decode_slow_tier_bytes"]
    assert moved["critical"] > 0 and moved["prefetched"] == 0 and moved["steps"] == 3
    assert moved["critical"] < hc["cache"]["retrieval_critical_bytes"]  # the warm-up step's refill is left out
    assert hc["critical_bytes_per_token"] == moved["critical"] / 3
    assert hc["critical_share_of_kv"] == pytest.approx(moved["critical"] / 3 / hc["kv_full_bytes"])
    assert hc["device_kv_read_bytes"] == pytest.approx(hc["cache"]["keep_fraction"] * hc["kv_full_bytes"])
    assert hc["device_metadata_bytes"] == hc["cache"]["summary_bytes"] > 0
    for name in ("full", "snapkv"):
        assert lines[name]["decode_slow_tier_bytes"] == {"critical": 0, "prefetched": 0, "steps": 3}
        assert lines[name]["device_metadata_bytes"] == 0
    assert "slow tier MB/token critical / prefetched" in (out / "table.md").read_text()
    assert "Projected decode step on H200" in printed and "Projected decode step on A100 80GB SXM" in printed
    projection = json.loads((out / "results.json").read_text())["projection"]
    mine = [r for r in projection if r["gpu"] == "H200" and r["method"] == "heterocache" and r["batch"] == 1]
    assert len(mine) == 1 and mine[0]["critical_bytes"] == pytest.approx(moved["critical"] / 3)
    assert mine[0]["critical_ms"] == pytest.approx(moved["critical"] / 3 / 55e9 * 1e3)
    largest = [r for r in projection if r.get("at_largest_full_batch") and r["gpu"] == "H200"]
    assert sorted(r["method"] for r in largest) == ["full", "heterocache", "snapkv"]
    assert largest[0]["batch"] == largest_batch(hc["weight_resident_bytes"], hc["kv_full_bytes"], 141e9)

    # the directory as the source of the shares of a projection without running
    assert main(["bench", "--project", "h200", "--model-config", "tiny", "--context", "1024", "--batch", "2",
                 "--moved-share-from", str(out), "--methods", "heterocache", "--out", str(tmp_path / "p")]) == 0
    text = capsys.readouterr().out
    assert f"measured in {out} at 256 tokens, batch 1" in text
    rows = json.loads((tmp_path / "p" / "projection.json").read_text())["rows"]
    row = next(r for r in rows if r["method"] == "heterocache" and r["batch"] == 2)
    assert row["critical_bytes"] == pytest.approx(hc["critical_share_of_kv"] * 2 * 1024 * 2 * 2 * 2 * 16 * 2)  # bf16
    assert row["kept"] == hc["cache"]["keep_fraction"] and row["source"] == "DIR @256"
    assert sorted({r["method"] for r in rows}) == ["full", "heterocache"]


def _llama_weight_read_bytes() -> int:
    per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    return 2 * (32 * per_layer + 4096 + 128256 * 4096)  # bf16; the input embedding table is not read


def test_projection_without_running_for_the_8b_shape(tmp_path, capsys, monkeypatch):
    """Llama-3.1-8B in bf16 at 131,072 tokens (17.18 GB of KV per row), HeteroCache with given shares."""
    monkeypatch.setattr(bench_run, "load_model_for_bench", lambda *a: pytest.fail("no model is loaded"))
    argv = ["bench", "--project", "h200", "--model-config", "llama-3.1-8b", "--context", "131072", "--batch", "1",
            "--methods", "snapkv,heterocache", "--keep", "0.25", "--moved-share", "0,0.034",
            "--kept-fraction", "0.25,0.216", "--out", str(tmp_path)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    w, kv = _llama_weight_read_bytes(), 131072 * 2 * 32 * 8 * 128 * 2
    assert kv == 17_179_869_184
    rows = {(r["method"], r["batch"]): r for r in json.loads((tmp_path / "projection.json").read_text())["rows"]}
    full, snap, hc = rows[("full", 1)], rows[("snapkv", 1)], rows[("heterocache", 1)]
    assert full["step_ms"] == pytest.approx((w + kv) / 4.8e12 * 1e3) and full["speedup_vs_full"] == 1
    assert snap["step_ms"] == pytest.approx((w + 0.25 * kv) / 4.8e12 * 1e3) and snap["critical_bytes"] == 0
    assert hc["hbm_bytes"] == pytest.approx(w + 0.216 * kv + 0.034 * kv)  # kept tokens + index (keep - kept)
    assert hc["critical_bytes"] == pytest.approx(0.034 * kv)  # 584 MB
    assert hc["critical_ms"] == pytest.approx(0.034 * kv / 55e9 * 1e3)  # 10.62 ms
    assert hc["step_ms"] == pytest.approx(((w + 0.25 * kv) / 4.8e12 + 0.034 * kv / 55e9) * 1e3)
    assert hc["bound_speedup"] == pytest.approx((w + kv) / (w + 0.216 * kv))
    assert hc["speedup_vs_full"] == pytest.approx(full["step_ms"] / hc["step_ms"])
    # FullKV's largest batch on 141 GB: (141e9 - 16.06e9) / 17.18e9 -> 7, projected too
    resident = w + 128256 * 4096 * 2
    assert rows[("full", 7)]["at_largest_full_batch"] and largest_batch(resident, kv, 141e9) == 7
    assert rows[("heterocache", 7)]["tokens_per_s"] == pytest.approx(7 / rows[("heterocache", 7)]["step_ms"] * 1e3)
    assert "| heterocache | 0.25 | 0.216 | 131072 | 1 | 19.3 | 584 | 0 | 4.02 | 10.6 | 0 | 14.6 |" in text
    assert "| full | 1 | 1.000 | 131072 | 1 | 32.2 | 0 | 0 | 6.71 | 0 | 0 | 6.71 |" in text
    assert "Shares of heterocache keep 0.25: given, --moved-share 0.034" in text
    assert "55 GB/s (PCIe Gen5 x16, usable throughput assumed)" in text


@pytest.mark.parametrize("argv, message", [
    (["--project", "h900"], "unknown GPU preset"),
    (["--hbm-tbps", "3"], "--hbm-tbps only applies with --project"),
    (["--moved-share", "0.1", "--methods", "heterocache"], "needs --project"),
    (["--project", "h200", "--moved-share", "0.1", "--methods", "heterocache"], "needs --model-config"),
    (["--project", "h200", "--model-config", "tiny", "--moved-share", "0.1"], "--moved-share needs --methods"),
    (["--project", "h200", "--model-config", "tiny", "--methods", "heterocache", "--keep", "0.25,0.1",
      "--moved-share", "0.1,0.2,0.3"], "one per compressed run"),
    (["--project", "h200", "--model-config", "tiny", "--methods", "heterocache", "--moved-share", "1.5"],
     "must be in [0, 1]"),
    (["--project", "h200", "--model-config", "tiny", "--methods", "heterocache", "--moved-share", "0.1",
      "--kept-fraction", "0.3"], "cannot exceed"),
    (["--project", "h200", "--model-config", "tiny", "--methods", "heterocache", "--moved-share", "0.1",
      "--interleave"], "--interleave only applies to a measured run"),
    (["--project", "h200", "--model-config", "tiny", "--moved-share", "0.1", "--moved-share-from", "."],
     "give one"),
    (["--project", "h200", "--model-config", "tiny", "--moved-share-from", "MISSING"], "no results.jsonl"),
    (["--kept-fraction", "0.2"], "only applies with --moved-share"),
])
def test_bad_projection_flags_are_errors_before_anything_loads(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(bench_run, "load_model_for_bench", lambda *a: pytest.fail("loaded a model"))
    monkeypatch.setattr(bench_project, "architecture_shape", lambda *a: pytest.fail("built a shape"))
    argv = [str(tmp_path / "missing") if a == "MISSING" else a for a in argv]
    with pytest.raises(SystemExit) as err:
        main(["bench", *argv])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_gpu_numbers_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "--project", "h200", "--link-gbps", "0"])
    assert err.value.code == 2 and "--link-gbps" in capsys.readouterr().err
