"""HeadProfile JSON round trip, validation errors, model checks, the profile cache, plot and CLI."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from heterocache.profiling import HeadProfile, model_fingerprint, profile_heads
from heterocache.profiling import api as profiling_api
from heterocache.profiling.cli import add_profile_command
from heterocache.profiling.plot import plot_profile


def tiny_model(seed=0, layers=2, kv_heads=2, hidden=64, heads=4):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(3)
    return torch.randint(0, 128, (1, 48))


def run(model, ids, cache_dir=False, **kw):
    options = {"max_new_tokens": 5, "topk": 8, "progress": False, **kw}
    return profile_heads(model, input_ids=ids, cache_dir=cache_dir, **options)


@pytest.fixture(scope="module")
def profile(model, ids):
    return run(model, ids)


def test_profile_contents(profile, model):
    assert profile.format == "heterocache.profile/1"
    assert (profile.n_layers, profile.n_kv_heads) == (2, 2)
    assert profile.model["head_dim"] == 16 and profile.model["fingerprint"] == model_fingerprint(model)
    settings = profile.settings
    assert settings["prompt_tokens"] == 48 and settings["decode_steps"] == 4 and settings["topk_effective"] == 8
    assert settings["stable_threshold_value"] == 0.5 and settings["similarity"] == "prefill"
    assert sum(profile.counts().values()) == 4
    for layer in range(2):
        assert sum(profile.counts(layer).values()) == 2
        for pivot, satellites in profile.stars(layer).items():
            assert profile.role(layer, pivot) == "pivot"
            assert all(profile.heads[layer][s].pivot == pivot for s in satellites)
    assert set(profile.full_heads()) == {(h.layer, h.head) for row in profile.heads for h in row
                                         if h.role in ("volatile", "pivot")}


def test_auto_thresholds_recorded(model, ids):
    auto = run(model, ids, stable_threshold="auto", sim_threshold="layer-quantile:0.5")
    settings = auto.settings
    assert settings["stable_threshold"] == "auto" and isinstance(settings["stable_threshold_value"], float)
    assert settings["stable_threshold_rule"] in ("otsu", "otsu-fallback-0.5")
    assert isinstance(settings["sim_threshold_value"], (float, list))
    assert settings["sim_threshold_rule"] == "layer-quantile:0.5"


def test_round_trip(profile, tmp_path):
    path = profile.save(tmp_path / "sub" / "p.json")
    loaded = HeadProfile.load(path)
    assert loaded.to_dict() == profile.to_dict()
    assert loaded.heads == profile.heads


def edited(profile, tmp_path, edit):
    data = copy.deepcopy(profile.to_dict())
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


def _set_head(position, **fields):
    def edit(d):
        d["heads"][position[0]][position[1]].update(fields)
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("format"), "not a heterocache profile"),
    (lambda d: d.update(format="heterocache.profile/2"), "unsupported profile format"),
    (lambda d: d.pop("heads"), "missing field 'heads'"),
    (lambda d: d["model"].pop("fingerprint"), "missing field.*fingerprint"),
    (lambda d: d["model"].update(n_layers=3), "expected 3 layers x 2 KV heads"),
    (lambda d: d["heads"][1].pop(), "per-layer lengths"),
    (lambda d: d["model"].update(head_dim="16"), "head_dim must be a positive integer"),
    (lambda d: d["heads"][0][0].pop("weight"), r"heads\[0\]\[0\] is missing field"),
    (lambda d: d.update(heads={}), "'heads' must be a list"),
    (_set_head((0, 1), head=0), "expected 0, 1"),
    (_set_head((0, 0), stability=1.5), "stability must be a number in"),
    (_set_head((0, 0), labels=["stable", None]), "labels\\[0\\] must be one of"),
    (_set_head((0, 0), labels=["anchor", "leader"]), "labels\\[1\\] must be one of"),
    (_set_head((0, 0), labels=["anchor"]), "must be \\[temporal, cluster\\]"),
])
def test_validation_errors(profile, tmp_path, edit, message):
    path = edited(profile, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as err:
        HeadProfile.load(path)
    assert "bad.json" in str(err.value)


def test_role_consistency_errors(tmp_path):
    def head(layer, idx, temporal, cluster=None, pivot=None, weight=1.0):
        return {"layer": layer, "head": idx, "stability": 0.5, "labels": [temporal, cluster],
                "pivot": pivot, "weight": weight}

    model = {"name": "m", "n_layers": 1, "n_kv_heads": 3, "head_dim": 4, "fingerprint": "x"}
    good = [head(0, 0, "anchor", "pivot", weight=None), head(0, 1, "volatile", "satellite", 0),
            head(0, 2, "volatile", weight=None)]
    base = {"format": "heterocache.profile/1", "model": model, "settings": {}, "heads": [good]}
    profile = HeadProfile.from_dict(base)
    assert profile.stars(0) == {0: [1]} and profile.counts() == {"anchor": 0, "volatile": 1, "pivot": 1,
                                                                 "satellite": 1}
    assert profile.full_heads() == [(0, 0), (0, 2)]
    cases = [
        ([head(0, 0, "anchor", "pivot", weight=None), head(0, 1, "anchor", "satellite", 2), good[2]],
         "satellite's 'pivot' must be the index of a pivot"),
        ([head(0, 0, "anchor", "pivot", weight=1.0), good[1], good[2]], "must be null for a full"),
        ([head(0, 0, "anchor", weight=None), head(0, 1, "anchor"), good[2]], "positive finite 'weight'"),
        ([head(0, 0, "anchor", pivot=1), head(0, 1, "anchor"), good[2]], "'pivot' must be null"),
        ([head(0, 0, "anchor", "pivot", weight=None), head(0, 1, "anchor"), good[2]], "pivot head has no satellite"),
    ]
    for heads, message in cases:
        with pytest.raises(ValueError, match=message):
            HeadProfile.from_dict({**base, "heads": [heads]}, source="case")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        HeadProfile.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        HeadProfile.load(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        HeadProfile.load(listed)


def test_fingerprint_stable_and_discriminating(model):
    assert model_fingerprint(model) == model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model)) == model_fingerprint(model)
    assert model_fingerprint(tiny_model(seed=1)) != model_fingerprint(model)


@pytest.mark.parametrize("other, message", [
    (dict(layers=3), "n_layers=2 in the profile"),
    (dict(kv_heads=1), "n_kv_heads=2 in the profile"),
    (dict(hidden=128, heads=4), "head_dim=16 in the profile"),
    (dict(seed=7), "fingerprint"),
])
def test_check_model_mismatch(profile, model, other, message):
    profile.check_model(model)
    with pytest.raises(ValueError, match=message):
        profile.check_model(tiny_model(**other))


def test_cache_hit_returns_identical_without_recomputing(model, ids, tmp_path, monkeypatch):
    first = run(model, ids, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1

    def boom(*args, **kwargs):
        raise AssertionError("capture ran on a cache hit")

    monkeypatch.setattr(profiling_api, "capture", boom)
    second = run(model, ids, cache_dir=tmp_path)
    assert second.to_dict() == first.to_dict()
    with pytest.raises(AssertionError, match="cache hit"):  # other settings -> another key -> recompute
        run(model, ids, cache_dir=tmp_path, topk=4)
    with pytest.raises(AssertionError, match="cache hit"):  # other text -> recompute
        run(model, ids[:, :40], cache_dir=tmp_path)


def test_cache_dir_env_and_disabled(model, ids, tmp_path, monkeypatch):
    monkeypatch.setenv("HETEROCACHE_CACHE_DIR", str(tmp_path / "root"))
    run(model, ids, cache_dir=None, max_new_tokens=2)
    assert len(list((tmp_path / "root" / "profiles").glob("*.json"))) == 1
    run(model, ids, cache_dir=False, max_new_tokens=3)
    assert len(list((tmp_path / "root" / "profiles").glob("*.json"))) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(similarity="median"), "similarity='median' is invalid"),
    (dict(similarity="decode_median", max_new_tokens=1), "needs max_new_tokens >= 2"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(topk=0), "topk=0"),
    (dict(max_length=2.5), "max_length=2.5"),
    (dict(stable_threshold=2.0), "stable_threshold=2.0"),
    (dict(sim_threshold="often"), "sim_threshold='often'"),
    (dict(texts=["a"]), "either texts= or input_ids="),
    (dict(max_new_tokens=300), "more than the model's context of 256"),
])
def test_argument_errors(model, ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(model, ids, **kwargs)


def test_needs_tokenizer_without_ids(model):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        profile_heads(model, cache_dir=False, progress=False)


def test_plot_writes_png(profile, tmp_path):
    path = plot_profile(profile, tmp_path / "heads.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class ModTokenizer:
    """Stand-in tokenizer: code points modulo the tiny vocabulary."""

    def __call__(self, text, truncation=False, max_length=None, add_special_tokens=True):
        ids = [ord(c) % 128 for c in text]
        return type("Encoding", (), {"input_ids": ids[:max_length] if truncation else ids})()


def test_cli_profile(model, tmp_path, monkeypatch, capsys):
    import heterocache.models

    monkeypatch.setattr(heterocache.models, "load_model", lambda name=None: (model, ModTokenizer()))
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 5)
    parser = argparse.ArgumentParser()
    add_profile_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile", "--texts", str(tmp_path), "--input-len", "30", "--max-new-tokens", "3",
                              "--topk", "4", "--stable-threshold", "auto", "--sim-threshold", "0.4",
                              "--no-cache", "--quiet", "--out", str(tmp_path / "p.json"),
                              "--plot", str(tmp_path / "p.png")])
    assert args.func(args) == 0
    loaded = HeadProfile.load(tmp_path / "p.json")
    assert loaded.settings["prompt_tokens"] == 30 and loaded.settings["sim_threshold_value"] == 0.4
    assert (tmp_path / "p.png").is_file()
    assert "otsu" in capsys.readouterr().out
