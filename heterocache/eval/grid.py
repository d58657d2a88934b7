"""The comparison protocol shared by ``heterocache eval`` and ``heterocache bench``.

FullKV runs once, at keep 1.0 whatever ``keeps`` says; every other method runs at every ``keep``;
all of them on the same inputs (samples, fidelity windows, bench prompts), so differences come from
the cache alone (docs/DESIGN.md s.7). Jobs already in the result log are skipped (resume).

A job's cache sits behind a :class:`Feeder`: ``feeder(input_ids)`` runs the model over the next
ids through that cache and returns the logits. Ours is a ``HeadwiseCache`` handed to the model;
a peer method (``kvpress:PRESS``, heterocache.peers) is a ``PeerSession`` whose first call is the
prefill under the press and whose later calls decode with absolute positions; the FullKV reference
of the fidelity protocol is a plain ``DynamicCache``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch

Input = TypeVar("Input")


def method_grid(methods: Sequence[str], keeps: Sequence[float]) -> list[tuple[str, float]]:
    """``(method, keep)`` pairs: ``("full", 1.0)`` first when selected, then every method x keep."""
    grid = [("full", 1.0)] if "full" in methods else []
    return grid + [(method, keep) for method in methods if method != "full" for keep in keeps]


def pending(inputs: Iterable[Input], grid: Sequence[tuple[str, float]],
            is_done: Callable[[Input, str, float], bool]) -> list[tuple[Input, list[tuple[str, float]]]]:
    """Per input (in order), the grid pairs not done yet; inputs with nothing left are omitted."""
    out = []
    for item in inputs:
        runs = [(method, keep) for method, keep in grid if not is_done(item, method, keep)]
        if runs:
            out.append((item, runs))
    return out


def is_peer(method: str) -> bool:
    return method.startswith("kvpress:")


class Feeder:
    """One job's cache behind one call: ``feeder(input_ids (B, q), **forward_kwargs) -> logits``."""

    def __init__(self, model, cache=None, session=None):
        self.model, self.cache, self.session = model, cache, session

    @classmethod
    def open(cls, model, method: str, keep: float, options: dict[str, Any] | None = None) -> Feeder:
        """A fresh cache for ``method`` at ``keep`` (``hc.make_cache``, or a peer's session)."""
        if is_peer(method):
            from heterocache.peers import make_peer_session

            return cls(model, session=make_peer_session(model, method, keep, **(options or {})))
        from heterocache import make_cache

        return cls(model, cache=make_cache(model, method, keep, **(options or {})))

    @classmethod
    def reference(cls, model) -> Feeder:
        """Uncompressed ``DynamicCache`` (the fidelity reference)."""
        from transformers import DynamicCache

        return cls(model, cache=DynamicCache(config=model.config))

    def __call__(self, input_ids: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
        if self.session is not None:
            if not self.session.prompt_len:
                return self.session.prefill(input_ids, **forward_kwargs)
            return self.session.decode(input_ids, **forward_kwargs)
        from heterocache.hf import cache_kwargs

        out = self.model(input_ids=input_ids, use_cache=True, **cache_kwargs(self.cache, self.model),
                         **forward_kwargs)
        return out.logits

    def stats(self) -> dict[str, Any]:
        source = self.session if self.session is not None else self.cache
        return source.stats() if hasattr(source, "stats") else {}

    def close(self) -> None:
        source = self.session if self.session is not None else self.cache
        if hasattr(source, "close"):
            source.close()
