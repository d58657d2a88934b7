"""Peer names and the missing-kvpress error: run in every environment (kvpress not needed)."""

from __future__ import annotations

import sys

import pytest

from heterocache.peers import available_peer_methods, is_peer_method, make_peer_session, parse_peer_name
from heterocache.peers.kvpress import peer_method_names


def test_parse_names():
    assert parse_peer_name("kvpress:snapkv").press == "snapkv"
    spec = parse_peer_name("kvpress:adakv+expected_attention")
    assert (spec.wrapper, spec.press, spec.masks) == ("adakv", "expected_attention", True)
    assert not parse_peer_name("kvpress:criticalkv+tova").masks  # CriticalKV drops, CriticalAdaKV masks
    assert is_peer_method("kvpress:anything") and not is_peer_method("snapkv")
    assert "kvpress:adakv+snapkv" in peer_method_names()


@pytest.mark.parametrize("name", ["kvpress:nope", "kvpress:", "snapkv", "kvpress:snapkv+adakv", "kvpress:a+b+c"])
def test_unknown_name_lists_valid_ones(name):
    with pytest.raises(ValueError, match="valid: kvpress:snapkv"):
        parse_peer_name(name)


def test_missing_kvpress_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvpress", None)  # makes `import kvpress` raise ImportError
    assert available_peer_methods() == []
    with pytest.raises(ImportError, match=r'pip install -e "\.\[peers\]".*make peers'):
        make_peer_session(object(), "kvpress:snapkv", 0.5)
    with pytest.raises(ValueError, match="unknown peer method"):  # names are checked before the import
        make_peer_session(object(), "kvpress:nope", 0.5)
