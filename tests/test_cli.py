"""The ``heterocache`` command line: user errors are caught before any model loads, as ``error: ...``
on stderr with exit code 2 and no traceback; a broken subcommand module fails loudly."""

from __future__ import annotations

import sys

import pytest

import heterocache
import heterocache.models
from heterocache.cli import build_parser, main


@pytest.fixture()
def no_model(monkeypatch):
    """Any model load fails the test: every check below must happen before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(heterocache.models, "load_model", refuse)
    monkeypatch.setattr(heterocache, "load_model", refuse)


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``heterocache ARGV`` run in-process."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    return code, err


@pytest.fixture()
def a_file(tmp_path):
    path = tmp_path / "a_file.txt"
    path.write_text("not a directory")
    return path


BAD_INPUT = [
    # generate
    (["generate", "--prompt", "hi", "--method", "bogus"], "bogus"),
    (["generate", "--prompt", "hi", "--keep", "1.5"], "keep"),
    (["generate", "--prompt-file", "/nonexistent/prompt.txt"], "/nonexistent/prompt.txt"),
    (["generate", "--prompt", "hi", "--method", "snapkv", "--option", "nosuch=1"], "nosuch"),
    (["generate", "--prompt", "hi", "--method", "snapkv", "--option", "window"], "NAME=VALUE"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--prompt", "hi", "--model", "{a_file}"], "is not a GGUF file"),
    (["generate", "--prompt", "hi", "--model", "/nonexistent/m.gguf"], "/nonexistent/m.gguf"),
    # demo
    (["demo", "--methods", "full,bogus"], "bogus"),
    (["demo", "--keep", "0"], "keep"),
    (["demo", "--out", "{a_file}"], "--out"),
    # profile
    (["profile", "--texts", "/nonexistent/texts", "--out", "x.json"], "--texts"),
    (["profile", "--topk", "0"], "--topk"),
    (["profile", "--max-length", "-3"], "--max-length"),
    (["profile", "--stable-threshold", "2"], "stable"),
    (["profile", "--sim-threshold", "quantile:7"], "sim"),
    (["profile", "--out", "{tmp}"], "--out"),
    (["profile", "--plot", "{a_file}/heads.png"], "--plot"),
    (["profile", "--model", "/nonexistent/m.gguf"], "/nonexistent/m.gguf"),
    # eval
    (["eval", "passkey", "--methods", "full,snapkv", "--option", "snapkv.nosuch=1"], "nosuch"),
    (["eval", "passkey", "--methods", "full,bogus"], "bogus"),
    (["eval", "passkey", "--limit", "0"], "--limit"),
    (["eval", "passkey", "--out", "{a_file}"], "--out"),
    (["eval", "passkey", "--text-dir", "/nonexistent/essays"], "--text-dir"),
    (["eval", "passkey", "--lengths", "100,-5"], "--lengths"),
    (["eval", "passkey", "--depths", "0.5,1.5"], "--depths"),
    (["eval", "fidelity", "--windows", "0"], "--windows"),
    (["eval", "passkey", "--dtype", "float8"], "--dtype"),
    (["eval", "fidelity", "--methods", "full,kvpress:nope"], "unknown peer method 'kvpress:nope'"),
    (["eval", "passkey", "--sequential", "1"], "--sequential"),
    (["eval", "passkey", "--model", "{a_file}"], "is not a GGUF file"),
    (["eval", "niah", "--sequential", "3"], "--sequential"),
    (["demo", "--question-mode", "later"], "--question-mode"),
    # report
    (["report", "/nonexistent/run"], "does not exist"),
    # bench
    (["bench", "--methods", "bogus"], "bogus"),
    (["bench", "--keep", "0"], "keep"),
    (["bench", "--context", "0"], "--context"),
    (["bench", "--steps", "0"], "--steps"),
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--max-batch-limit", "0"], "--max-batch-limit"),
    (["bench", "--methods", "snapkv", "--option", "snapkv.nosuch=1"], "nosuch"),
    (["bench", "--methods", "snapkv", "--option", "h2o.window=3"], "no selected method"),
    (["bench", "--layers", "2"], "--layers"),
    (["bench", "--out", "{a_file}"], "--out"),
    (["bench", "--model", "/nonexistent/model-dir"], "/nonexistent/model-dir"),
    # model
    (["model", "fetch", "bogus"], "invalid choice"),
    # methods
    (["methods", "--bogus"], "--bogus"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in
                                                               enumerate(BAD_INPUT)])
def test_bad_input_is_an_error_before_any_model_load(argv, message, no_model, capsys, tmp_path, a_file):
    argv = [a.format(a_file=a_file, tmp=tmp_path) for a in argv]
    code, err = run(argv, capsys)
    assert code == 2, err
    assert "error: " in err and message.format(a_file=a_file, tmp=tmp_path) in err
    assert "Traceback" not in err


def test_missing_model_path_is_an_error_not_a_traceback(capsys):
    code, err = run(["generate", "--prompt", "hi", "--model", "/nonexistent/model-dir"], capsys)
    assert code == 2 and "error: " in err and "/nonexistent/model-dir" in err


def test_a_broken_subcommand_module_is_not_silently_dropped(monkeypatch):
    monkeypatch.setitem(sys.modules, "heterocache.eval.cli", None)  # makes `import heterocache.eval.cli` fail
    with pytest.raises(ImportError):
        build_parser()


def test_every_subcommand_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"methods", "generate", "demo", "profile", "eval", "report", "bench",
                                "model"}


def test_option_syntax_splits_the_method_at_the_last_dot():
    """``[METHOD.]NAME=VALUE``: method names may contain ':' (peers) and values may contain '.'."""
    from dataclasses import dataclass
    from typing import ClassVar

    from heterocache.eval.arguments import method_options
    from heterocache.methods.base import Method, register

    @register
    @dataclass
    class PeerForTest(Method):
        name: ClassVar[str] = "_peer:snap.v2"
        window: int = 4
        note: str = ""

    methods = ["_peer:snap.v2", "snapkv"]
    assert method_options(["_peer:snap.v2.note=a.b=c", "window=8"], methods) == {
        "_peer:snap.v2": {"note": "a.b=c", "window": 8}, "snapkv": {"window": 8}}
    assert method_options(["snapkv.window=3"], methods) == {"snapkv": {"window": 3}}
    with pytest.raises(ValueError, match="unknown option"):
        method_options(["_peer:snap.v2.nosuch=1"], methods)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        method_options(["window"], methods)


def test_peer_methods_without_kvpress_name_the_extra(no_model, capsys, monkeypatch):
    import heterocache.peers.kvpress as kvpress

    monkeypatch.setattr(kvpress, "kvpress_available", lambda: False)
    code, err = run(["eval", "fidelity", "--methods", "full,kvpress:snapkv"], capsys)
    assert code == 2 and 'pip install -e ".[peers]"' in err and "Traceback" not in err
    code, err = run(["bench", "--methods", "kvpress:expected_attention"], capsys)
    assert code == 2 and "make peers" in err
