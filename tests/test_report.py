"""Report from a hand-written run directory: merged shards, hand-computed means, PNG files."""

from __future__ import annotations

import json
import math

import pytest

from heterocache.eval.report import build_report, summarize


def _line(task, sample, method, keep, score, kept, **extra):
    return {"suite": "ruler", "task": task, "sample_id": sample, "method": method, "keep": keep,
            "question_mode": "prefill", "model": "m", "settings": "s", "prediction": "p", "gold": ["g"],
            "score": score, "keep_fraction": kept, "tokens_per_s": 10.0, "prefill_s": 1.0, "extra": extra}


def _write(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.fixture()
def run_dir(tmp_path):
    _write(tmp_path / "results.shard0of2.jsonl", [
        _line("vt", "0", "full", 1.0, 1.0, 1.0), _line("vt", "0", "snapkv", 0.5, 1.0, 0.5),
        _line("vt", "0", "snapkv", 0.25, 0.0, 0.26),
        _line("cwe", "0", "full", 1.0, 0.5, 1.0), _line("cwe", "0", "snapkv", 0.5, 0.2, 0.5),
        _line("cwe", "0", "snapkv", 0.25, 0.1, 0.25),
    ])
    _write(tmp_path / "results.shard1of2.jsonl", [
        _line("vt", "1", "full", 1.0, 0.0, 1.0), _line("vt", "1", "snapkv", 0.5, 0.5, 0.52),
        _line("vt", "1", "snapkv", 0.25, 0.0, 0.24),
        _line("cwe", "1", "full", 1.0, 0.7, 1.0), _line("cwe", "1", "snapkv", 0.5, 0.4, 0.5),
        _line("cwe", "1", "snapkv", 0.25, 0.3, 0.25),
        _line("cwe", "1", "snapkv", 0.25, 0.5, 0.25),  # a rerun of the same key: the last line wins
    ])
    _write(tmp_path / "results.jsonl", [
        {**_line("niah", f"len{n}-depth{d:g}", "snapkv", 0.5, s, 0.5, length=n, depth=d), "suite": "niah"}
        for n, d, s in [(1000, 0.0, 1.0), (1000, 1.0, 0.5), (2000, 0.0, 0.25), (2000, 1.0, 0.0)]
    ])
    fid = [{"window": w, "offset": 0, "method": "snapkv", "keep": 0.5, "model": "m", "settings": "s", "tokens": 64,
            "kl": kl, "top1": t, "nll": n, "ppl": math.exp(n), "keep_fraction": 0.5}
           for w, kl, t, n in [(0, 0.02, 0.9, 3.0), (1, 0.04, 0.8, 3.2)]]
    _write(tmp_path / "fidelity.jsonl", fid)
    return tmp_path


def test_summary_means_are_hand_computed(run_dir):
    rows = {(r["task"], r["method"], r["keep"]): r for r in summarize(run_dir)["tasks"]}
    assert rows[("vt", "full", 1.0)]["score"] == 50.0
    assert rows[("vt", "snapkv", 0.5)]["score"] == 75.0
    assert rows[("vt", "snapkv", 0.5)]["keep_measured"] == pytest.approx(0.51)
    assert rows[("cwe", "snapkv", 0.25)]["score"] == 30.0 and rows[("cwe", "snapkv", 0.25)]["n"] == 2
    assert rows[("cwe", "full", 1.0)]["score"] == 60.0
    assert rows[("niah", "snapkv", 0.5)]["score"] == 43.75
    fid = summarize(run_dir)["fidelity"][0]
    assert fid["kl"] == pytest.approx(0.03) and fid["top1"] == pytest.approx(0.85)
    assert fid["ppl"] == pytest.approx(math.exp(3.1), rel=1e-4) and fid["windows"] == 2


def test_report_tables_and_plots(run_dir):
    text = build_report(run_dir)
    assert (run_dir / "report.md").read_text() == text
    assert "| full | 2 | 50.00 (1.000) | 50.00 (1.000) |" in text  # vt; FullKV fills every keep column
    assert "| snapkv | 2 | 75.00 (0.510) | 0.00 (0.250) |" in text  # vt
    assert "| snapkv | 2 | 30.00 (0.500) | 30.00 (0.250) |" in text  # cwe
    # average over vt and cwe: snapkv keep 0.5 -> (75 + 30) / 2, measured keep (0.51 + 0.5) / 2
    assert "| snapkv | - | 52.50 (0.505) | 15.00 (0.250) |" in text
    assert "| snapkv | 0.5 | 0.500 | 0.0300 | 0.850 | 22.20 | - | - | - | 2 |" in text
    for name in ("score_vs_keep_ruler.png", "score_vs_keep_niah.png", "kl_vs_keep.png", "niah_snapkv_keep0.5.png"):
        assert (run_dir / name).stat().st_size > 1000
        assert f"![{name}]({name})" in text
    assert json.loads((run_dir / "summary.json").read_text())["fidelity"][0]["windows"] == 2


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "missing")
    with pytest.raises(ValueError, match="no results"):
        build_report(tmp_path)


def test_peers_are_marked_with_their_real_memory(run_dir):
    base = {"window": 0, "offset": 0, "keep": 0.25, "model": "m", "settings": "s", "tokens": 64, "kl": 0.1,
            "top1": 0.8, "nll": 3.0, "ppl": math.exp(3.0)}
    lines = [{**base, "method": "kvpress:snapkv", "keep_fraction": 0.25, "stored_fraction": 0.25, "masked": False,
              "device_bytes": 2**20},
             {**base, "method": "kvpress:adakv+snapkv", "keep_fraction": 0.25, "stored_fraction": 1.0, "masked": True,
              "device_bytes": 4 * 2**20}]
    with open(run_dir / "fidelity.jsonl", "a") as handle:
        handle.write("".join(json.dumps(line) + "\n" for line in lines))
    text = build_report(run_dir, plots=False)
    assert "| kvpress:snapkv (peer) | 0.25 | 0.250 | 0.1000 | 0.800 | 20.09 | 1.0 | 0.0 | 0.0 | 1 |" in text
    assert ("| kvpress:adakv+snapkv (peer, masks: frees no memory) | 0.25 | 0.250 | 0.1000 | 0.800 | 20.09 | 4.0 | "
            "0.0 | 0.0 | 1 |") in text


def test_memory_and_transfer_beside_every_score(tmp_path):
    """Device MB, slow-tier MB and KB moved per decode forward: fidelity over its M - 1 teacher-forced steps,
    task lines over their decode steps plus the question fed token by token (question mode decode)."""
    fid = {"window": 0, "offset": 0, "keep": 0.25, "model": "m", "settings": "s", "tokens": 65, "kl": 0.1,
           "top1": 0.8, "nll": 3.0, "ppl": math.exp(3.0), "method": "heterocache", "keep_fraction": 0.22,
           "device_bytes": 3 * 2**20, "host_bytes": 10 * 2**20, "disk_bytes": 0, "retrieval_bytes": 64 * 2048}
    _write(tmp_path / "fidelity.jsonl", [fid])
    task = {**_line("vt", "0", "heterocache", 0.25, 1.0, 0.22), "question_mode": "decode", "prompt_tokens": 110,
            "context_tokens": 100, "decode_steps": 6,
            "cache": {"device_bytes": 2**20, "host_bytes": 2**21, "retrieval_bytes": 16 * 1024 * 100}}
    _write(tmp_path / "results.jsonl", [task])
    text = build_report(tmp_path)
    assert "| heterocache | 0.25 | 0.220 | 0.1000 | 0.800 | 20.09 | 3.0 | 10.0 | 2.0 | 1 |" in text
    assert "| heterocache | 0.25 | 1.0 | 2.0 | 100.0 |" in text  # 1600 KB over 6 + 10 decode forwards
    for name in ("kl_vs_device_mb.png", "kl_vs_bytes_moved.png", "score_vs_device_mb_ruler.png",
                 "score_vs_bytes_moved_ruler.png"):
        assert (tmp_path / name).stat().st_size > 1000 and f"![{name}]({name})" in text


def test_niah_grid_is_relative_to_fullkv(tmp_path):
    """The combined NIAH figure: each cell = mean score / FullKV's mean on the same (length, depth), capped
    at 1; NaN where FullKV scored 0; written as niah_grid.png when more than one method ran."""
    from heterocache.eval.report import niah_grid_values

    lines = []
    for n, d, full, snap, snap_low in [(1000, 0.0, 0.5, 0.25, 0.0), (1000, 1.0, 0.8, 1.0, 0.4),
                                       (2000, 0.0, 0.0, 0.5, 0.0), (2000, 1.0, 1.0, 0.5, 0.5)]:
        sample = f"len{n}-depth{d:g}"
        lines += [{**_line("niah", sample, "full", 1.0, full, 1.0, length=n, depth=d), "suite": "niah"},
                  {**_line("niah", sample, "snapkv", 0.5, snap, 0.5, length=n, depth=d), "suite": "niah"},
                  {**_line("niah", sample, "snapkv", 0.25, snap_low, 0.25, length=n, depth=d), "suite": "niah"}]
    _write(tmp_path / "results.jsonl", lines)
    text = build_report(tmp_path)
    assert "![niah_grid.png](niah_grid.png)" in text and (tmp_path / "niah_grid.png").stat().st_size > 1000
    from collections import defaultdict

    cells = defaultdict(lambda: defaultdict(list))
    for line in lines:
        cells[(line["method"], line["keep"])][(line["extra"]["length"], line["extra"]["depth"])].append(line["score"])
    methods, keeps, lengths, depths, values = niah_grid_values(cells)
    assert methods == ["snapkv"] and keeps == [0.5, 0.25] and lengths == [1000, 2000] and depths == [0.0, 1.0]
    high = values[("snapkv", 0.5)]  # rows: depths, columns: lengths
    assert high[0][0] == 0.5 and math.isnan(high[0][1]) and high[1][0] == 1.0 and high[1][1] == 0.5
    assert values[("snapkv", 0.25)][1] == [0.5, 0.5]
