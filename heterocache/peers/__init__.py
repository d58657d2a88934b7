"""Peer libraries' methods run inside this harness, on the same model and tokens (see docs/PEERS.md)."""

from heterocache.peers.kvpress import available_peer_methods, is_peer_method, parse_peer_name
from heterocache.peers.session import PeerSession, make_peer_session

__all__ = ["PeerSession", "available_peer_methods", "is_peer_method", "make_peer_session", "parse_peer_name"]
