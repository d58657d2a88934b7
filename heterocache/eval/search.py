"""Doubling + bisection: the largest size that fits (bench max batch, RULER haystack size)."""

from __future__ import annotations

from collections.abc import Callable


def largest_fitting(fits: Callable[[int], bool], limit: int | None = None, low: int = 1) -> int:
    """Largest ``n`` in ``[low, limit]`` with ``fits(n)``, for a monotone ``fits`` (true up to some
    ``n``, false after); ``low - 1`` when even ``low`` does not fit. Probes ``low, 2 low, 4 low, ...``
    until one fails (or passes ``limit``: then ``limit`` itself), then bisects the last gap."""
    if (limit is not None and limit < low) or not fits(low):
        return low - 1
    good, bad, probe = low, None, low * 2
    while limit is None or probe <= limit:
        if not fits(probe):
            bad = probe
            break
        good, probe = probe, probe * 2
    if bad is None:  # every doubling up to the limit fitted
        if good == limit or fits(limit):
            return limit
        bad = limit
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good
