"""The comparison protocol shared by ``heterocache eval`` and ``heterocache bench``.

FullKV runs once, at keep 1.0 whatever ``keeps`` says; every other method runs at every ``keep``;
all of them on the same inputs (samples, fidelity windows, bench prompts), so differences come from
the cache alone (docs/DESIGN.md s.7). Jobs already in the result log are skipped (resume).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

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


def build_cache(model, method: str, keep: float, options: dict[str, Any] | None = None):
    """A fresh cache for one job (``hc.make_cache``)."""
    from heterocache import make_cache

    return make_cache(model, method, keep, **(options or {}))
