"""``heterocache demo``'s table (demo.py): the drift gate's skipped refills instead of the paper
mode's trigger counter (always 0 for the default method)."""

from __future__ import annotations

import torch
from conftest import tiny_model

import heterocache as hc
from heterocache.demo import format_table, skipped_share
from heterocache.hf import cache_kwargs


def decode_stats(method: str, steps: int = 12) -> dict:
    model = tiny_model("llama", layers=2, heads=6, kv_heads=2)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(3))
    options = {"window": 8, "sinks": 2, "rank": 3, "page": 4} if method == "heterocache" else {}
    cache = hc.make_cache(model, method, 0.25, **options)
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache, model))
        for _ in range(steps):
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(cache, model))
    return cache.stats()


def row(method: str, refills_skipped) -> dict:
    return {"method": method, "keep": 0.25, "answers": ["12345"], "gold": ["12345"], "correct": 1, "total": 1,
            "keep_fraction": 0.25, "device_mb": 1.0, "host_mb": 2.0, "fetched_kb_per_token": 3.0,
            "decode_tokens_per_s": 4.0, "refills_skipped": refills_skipped}


def test_skipped_share_reads_the_drift_gate_counters():
    stats = decode_stats("heterocache")
    share = skipped_share([stats, stats])
    assert stats["retrieval_checked"] > 0
    assert share == stats["retrieval_skipped"] / stats["retrieval_checked"]
    assert skipped_share([{"retrieval_checked": 30, "retrieval_skipped": 10},
                          {"retrieval_checked": 10, "retrieval_skipped": 10}]) == 0.5  # pooled, not averaged
    assert skipped_share([decode_stats("snapkv")]) is None  # no gate: no share
    assert skipped_share([]) is None


def test_the_table_shows_refills_skipped_not_triggers():
    table = format_table([row("snapkv", None), row("heterocache", 0.734)], 3000, "decode")
    header, rule, snapkv, hetero = table.splitlines()[2:]
    assert header.endswith("| decode tok/s | refills skipped |") and "triggers" not in table
    assert rule.count("---") == header.count("|") - 1
    assert snapkv.endswith("| 4.0 | - |") and hetero.endswith("| 4.0 | 73% |")
