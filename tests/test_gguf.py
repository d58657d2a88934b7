"""GGUF files in ``hc.load_model`` (models.py, store/): dequantised once into the cache root's
safetensors copy keyed by the file's sha256, clear errors before transformers reads a bad file, and
``--model file.gguf`` on the command line."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import tiny_model
from gguf_helpers import write_llama_gguf

import heterocache as hc
import heterocache.models
import heterocache.store.gguf_file as gguf_file
from heterocache.cli import main
from heterocache.store.atomic import publish_dir


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("HETEROCACHE_CACHE_DIR", str(root))
    return root


def source_model():
    """The tiny random Llama with non-trivial norm weights (so a swapped norm would show)."""
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16, vocab=128)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture()
def source(tmp_path):
    model = source_model()
    return model, write_llama_gguf(model, tmp_path / "tiny.gguf")


def no_dequantising(monkeypatch):
    def refuse(path):
        raise AssertionError(f"transformers was asked to read {path}")

    monkeypatch.setattr(gguf_file, "load_gguf", refuse)


def logits(model, seed: int = 0):
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_gguf_round_trip_matches_the_source_model_then_reads_the_cache(source, cache_dir, monkeypatch):
    model, path = source
    loaded, tokenizer = hc.load_model(str(path))
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    assert tokenizer is not None and tokenizer.decode(tokenizer("the cat").input_ids) == "the cat"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    folder = cache_dir / "models" / f"tiny-{digest[:16]}"
    assert sorted(p.name for p in (cache_dir / "models").iterdir()) == [folder.name]  # no temp folder left
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()

    no_dequantising(monkeypatch)  # the second load reads the safetensors copy
    again, _ = hc.load_model(path, dtype="bfloat16")
    assert again.dtype == torch.bfloat16
    torch.testing.assert_close(logits(again).float(), logits(model), rtol=0.05, atol=0.05)
    same, _ = hc.load_model(str(path.parent), gguf_file=path.name)  # directory + gguf_file=: same copy
    torch.testing.assert_close(logits(same), logits(model), rtol=1e-5, atol=1e-5)


def test_a_changed_file_gets_a_new_copy(tmp_path, cache_dir):
    path = write_llama_gguf(source_model(), tmp_path / "tiny.gguf")
    hc.load_model(path)
    other = tiny_model("llama", seed=9)
    write_llama_gguf(other, path)  # same name, other bytes
    loaded, _ = hc.load_model(path)
    torch.testing.assert_close(logits(loaded), logits(other), rtol=1e-5, atol=1e-5)
    assert len(list((cache_dir / "models").iterdir())) == 2


def test_a_gguf_file_without_a_tokenizer_loads_with_tokenizer_none(tmp_path, cache_dir):
    model = source_model()
    loaded, tokenizer = hc.load_model(write_llama_gguf(model, tmp_path / "bare.gguf", tokenizer=False))
    assert tokenizer is None
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


def test_the_embedded_model_goes_through_the_same_dequantise(source, cache_dir, monkeypatch):
    model, path = source
    calls = []
    real = heterocache.models.dequantise
    monkeypatch.setattr(heterocache.models, "embedded_gguf_path", lambda: path)
    monkeypatch.setattr(heterocache.models, "dequantise", lambda *a: calls.append(a) or real(*a))
    loaded, _ = hc.load_model()
    assert calls == [(path, cache_dir / "models" / heterocache.models.EMBEDDED_NAME)]
    assert heterocache.models.is_embedded(loaded)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


def test_bad_files_are_clear_errors_before_transformers_reads_them(source, tmp_path, cache_dir, monkeypatch):
    _, path = source
    no_dequantising(monkeypatch)
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(ValueError, match=r"notes\.gguf.* is not a GGUF file"):
        hc.load_model(text)
    other = tmp_path / "weights.bin"  # any existing file is read as a GGUF candidate
    other.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"weights\.bin.* is not a GGUF file"):
        hc.load_model(other)
    data = path.read_bytes()
    for cut in (4, 200, len(data) // 2, len(data) - 8):
        truncated = tmp_path / "truncated.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"truncated\.gguf.* (is truncated|is not a readable GGUF file)"):
            hc.load_model(truncated)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        hc.load_model(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        hc.load_model(tmp_path, gguf_file="missing.gguf")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        hc.load_model(tmp_path / "no-such-dir", gguf_file="tiny.gguf")
    with pytest.raises(ValueError, match="directory holding it"):
        hc.load_model(path, gguf_file="tiny.gguf")
    with pytest.raises(ValueError, match="gguf_file= needs name_or_path="):
        hc.load_model(None, gguf_file="tiny.gguf")
    with pytest.raises(ValueError, match="name_or_path must be"):
        hc.load_model(3)
    assert not (cache_dir / "models").exists()  # nothing was written


def test_an_architecture_transformers_cannot_dequantise_is_named(tmp_path, cache_dir, monkeypatch):
    path = write_llama_gguf(source_model(), tmp_path / "odd.gguf", architecture="rwkv6")
    no_dequantising(monkeypatch)
    with pytest.raises(ValueError, match=r"architecture 'rwkv6'.*supports .*llama.*qwen2"):
        hc.load_model(path)


def test_a_writer_that_loses_the_race_discards_its_copy(tmp_path):
    target = tmp_path / "models" / "m"

    def write(into):
        (into / "model.safetensors").write_text("mine")
        # meanwhile another process publishes the same entry
        publish_dir(target, lambda other: (other / "model.safetensors").write_text("theirs"), complete)

    def complete(folder):
        return (folder / "model.safetensors").is_file()

    assert publish_dir(target, write, complete) is False
    assert (target / "model.safetensors").read_text() == "theirs"
    assert [p.name for p in target.parent.iterdir()] == ["m"]  # both temp folders are gone
    assert publish_dir(target, write, complete) is False  # already there: write is not called

    def fail(into):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        publish_dir(tmp_path / "models" / "n", fail, complete)
    assert [p.name for p in target.parent.iterdir()] == ["m"]


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_model_gguf_generates(source, cache_dir, capsys):
    _, path = source
    code, out, err = run(["generate", "--model", str(path), "--prompt", "the cat", "--no-chat",
                          "--max-new-tokens", "3", "--quiet-stats"], capsys)
    assert code == 0, err
    assert "keep_fraction" in err  # the stats went to stderr, the text to stdout


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["profile"], ["eval", "passkey"], ["bench"]])
def test_cli_bad_gguf_is_an_error_before_any_model_load(command, tmp_path, cache_dir, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before --model was checked")

    monkeypatch.setattr(heterocache.models, "load_model", refuse)
    monkeypatch.setattr(hc, "load_model", refuse)
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model")
    for model, message in ((bad, "is not a GGUF file"), (tmp_path / "missing.gguf", "does not exist")):
        code, _, err = run([*command, "--model", str(model)], capsys)
        assert code == 2 and "error: " in err and str(model) in err and message in err, err
        assert "Traceback" not in err
