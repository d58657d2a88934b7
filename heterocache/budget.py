"""Turn ``keep`` into token budgets (docs/DESIGN.md section 2).

Every method keeps, per batch row, exactly ``total_budget(keep, L, N, Hkv)`` prompt entries summed
over all layers x KV heads, where ``L`` is that row's prompt length. The functions here only decide
how that total is spread:

- :func:`uniform_budgets`: ``keep * L`` per (layer, KV head), remainder one token at a time, layer-major.
- :func:`pyramid_budgets`: PyramidKV's arithmetic layer schedule (spec/baselines.md section 4).
- :func:`weighted_budgets`: proportional water-filling with per-item bounds (CAKE, HeteroCache).
- :func:`allocate`: HeteroCache's per-head budgets and full-head flags from a head profile.
- :func:`cap_sliding`: hybrid models: sliding-window layers keep at most ``min(L, W - 1)`` entries
  per head; what they cannot hold goes to the full-attention heads (docs/DESIGN.md s.2).

All integer results are exact: rationals (:class:`fractions.Fraction`) inside, largest remainder
rounding with ties broken by the lower index, so the same inputs always give the same budgets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch

EPS = 1e-6  # stability floor of the profile weights w = M / (S + eps)

__all__ = [
    "allocate",
    "budget_table",
    "cap_sliding",
    "sliding_cap",
    "pyramid_budgets",
    "split_evenly",
    "total_budget",
    "uniform_budgets",
    "validate_keep",
    "water_fill",
    "weighted_budgets",
]


def validate_keep(keep: float) -> float:
    """Return ``keep`` as a float, or raise ``ValueError`` unless ``0 < keep <= 1`` (NaN rejected).

    Numbers and numeric strings (``"0.25"``, as a command line gives them) are accepted; booleans are
    not (``True`` would otherwise read as keep 1.0), nor are numpy / torch booleans.
    """
    dtype = getattr(keep, "dtype", None)  # numpy / torch scalars
    if isinstance(keep, bool) or dtype is torch.bool or str(dtype) == "bool":
        raise ValueError(f"keep must be a number in the range (0, 1], got the boolean {keep!r}; "
                         "pass a fraction such as 0.25 (1.0 keeps everything)")
    try:
        value = float(keep)
    except (TypeError, ValueError):
        raise ValueError(f"keep must be a number in the range (0, 1], got {keep!r}") from None
    if not (0.0 < value <= 1.0):  # also False for NaN
        raise ValueError(f"keep must be in the range (0, 1] (fraction of prompt KV kept), got {keep!r}")
    return value


def total_budget(keep: float, prompt_len: int, n_layers: int, n_kv_heads: int) -> int:
    """Kept prompt entries over all layers x KV heads: ``round(keep * prompt_len * n_layers * n_kv_heads)``."""
    keep = validate_keep(keep)
    return round(keep * prompt_len * n_layers * n_kv_heads)


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers differing by at most one, the larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def uniform_budgets(keep: float, prompt_len: int, n_layers: int, n_kv_heads: int) -> list[list[int]]:
    """Uniform per-(layer, KV head) budgets, ``[n_layers][n_kv_heads]``.

    Each entry is ``floor(T / (N * Hkv))`` or one more; the remainder goes to the first (layer,
    head) pairs in layer-major order, so the sum is exactly ``T = total_budget(...)`` and no entry
    exceeds ``prompt_len``.
    """
    flat = split_evenly(total_budget(keep, prompt_len, n_layers, n_kv_heads), n_layers * n_kv_heads)
    return [flat[layer * n_kv_heads : (layer + 1) * n_kv_heads] for layer in range(n_layers)]


def pyramid_budgets(
    keep: float, prompt_len: int, n_layers: int, n_kv_heads: int, window: int, beta: float = 20
) -> list[list[int]]:
    """PyramidKV layer schedule as per-(layer, KV head) budgets, ``[n_layers][n_kv_heads]``, window included.

    With ``C = keep * L`` (exact rational) and ``w = min(window, L)``: ``m_min = (C - w) / beta``,
    ``m_max = 2 (C - w) - m_min``; if ``m_max >= L - w`` then ``m_max = L - w`` and
    ``m_min = 2 (C - w) - m_max``. Layer ``l`` gets ``b_l = m_max - l (m_max - m_min) / (N - 1)``
    prefix tokens plus the window (largest at the bottom). The prefix part is distributed in
    proportion to ``b_l`` with :func:`weighted_budgets` (capped at ``L - w``, excess redistributed),
    so the total is exactly ``total_budget(...)``. Each layer's entries are split evenly over its
    KV heads. If ``C < w`` the schedule degenerates to :func:`uniform_budgets`.
    """
    total = total_budget(keep, prompt_len, n_layers, n_kv_heads)
    window = min(window, prompt_len)
    prefix_total = total - n_layers * n_kv_heads * window
    capacity = Fraction(keep) * prompt_len
    if prefix_total < 0 or capacity < window:
        return uniform_budgets(keep, prompt_len, n_layers, n_kv_heads)
    prefix_mean = capacity - window
    m_min = prefix_mean / Fraction(beta)
    m_max = 2 * prefix_mean - m_min
    if m_max >= prompt_len - window:
        m_max = Fraction(prompt_len - window)
        m_min = 2 * prefix_mean - m_max
    steps = max(n_layers - 1, 1)
    weights = [m_max - layer * (m_max - m_min) / steps for layer in range(n_layers)]
    caps = [n_kv_heads * (prompt_len - window)] * n_layers
    prefix = weighted_budgets(prefix_total, weights, caps)
    return [split_evenly(p + n_kv_heads * window, n_kv_heads) for p in prefix]


def water_fill(
    total: int, weights: Sequence[float], caps: Sequence[int], minimum: Sequence[int] | int = 0
) -> list[Fraction]:
    """Exact real-valued water-filling: ``x_i = clamp(lam * w_i, min_i, cap_i)`` with ``sum x = min(total, sum caps)``.

    Items with zero weight stay at their minimum unless every weighted item is at its cap, in
    which case the rest is shared among them equally (also the rule when all weights are zero).
    Raises ``ValueError`` if ``total < sum(minimum)`` or a minimum exceeds its cap.
    """
    n = len(weights)
    mins = [int(minimum)] * n if isinstance(minimum, int) else [int(m) for m in minimum]
    caps = [int(c) for c in caps]
    if len(caps) != n or len(mins) != n:
        raise ValueError(f"weights, caps and minimum need the same length, got {n}, {len(caps)}, {len(mins)}")
    ws = []
    for w in weights:
        if isinstance(w, float) and not math.isfinite(w):
            raise ValueError(f"weights must be finite and >= 0, got {w!r}")
        w = Fraction(w)
        if w < 0:
            raise ValueError(f"weights must be finite and >= 0, got {float(w)!r}")
        ws.append(w)
    if any(m > c for m, c in zip(mins, caps)):
        raise ValueError(f"minimum {mins} exceeds caps {caps} for some item")
    if total < sum(mins):
        raise ValueError(f"total budget {total} is smaller than the sum of minimums {sum(mins)}")
    target = min(total, sum(caps))
    weighted = [i for i in range(n) if ws[i] > 0]
    zero = [i for i in range(n) if ws[i] == 0]
    out = [Fraction(m) for m in mins]
    full = sum(caps[i] for i in weighted) + sum(mins[i] for i in zero)
    if target >= full:
        for i in weighted:
            out[i] = Fraction(caps[i])
        if zero:
            rest = water_fill(target - full + sum(mins[i] for i in zero), [1] * len(zero),
                              [caps[i] for i in zero], [mins[i] for i in zero])
            for i, x in zip(zero, rest):
                out[i] = x
        return out

    def filled(lam: Fraction) -> Fraction:
        return sum((min(max(lam * ws[i], mins[i]), caps[i]) for i in weighted), Fraction(sum(mins[i] for i in zero)))

    # f(lam) is piecewise linear and non-decreasing; its kinks are min_i / w_i and cap_i / w_i.
    kinks = sorted({Fraction(0)} | {Fraction(b) / ws[i] for i in weighted for b in (mins[i], caps[i])})
    lo, hi = 0, len(kinks) - 1  # filled(kinks[-1]) == full > target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if filled(kinks[mid]) <= target else (lo, mid)
    a, b = kinks[lo], kinks[hi]
    fa, fb = filled(a), filled(b)
    lam = a if fb == fa else a + (target - fa) * (b - a) / (fb - fa)
    for i in weighted:
        out[i] = min(max(lam * ws[i], Fraction(mins[i])), Fraction(caps[i]))
    return out


def weighted_budgets(
    total: int, weights: Sequence[float], caps: Sequence[int], minimum: Sequence[int] | int = 0
) -> list[int]:
    """Integer budgets proportional to ``weights``, each in ``[minimum, cap]``, summing to ``min(total, sum(caps))``.

    Water-filling (:func:`water_fill`): what a capped item cannot use is redistributed to the
    others in proportion to their weights. Rounding is largest remainder, ties to the lower index.

    Examples
    --------
    >>> weighted_budgets(10, [1, 1, 2], caps=[10, 2, 10])
    [3, 2, 5]
    """
    exact = water_fill(total, weights, caps, minimum)
    floors = [math.floor(x) for x in exact]
    left = int(sum(exact)) - sum(floors)
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - floors[i]), i))
    for i in order[:left]:
        floors[i] += 1
    return floors


def sliding_cap(prompt_len: int, window: int | None) -> int:
    """Most prompt entries a head of a layer with sliding ``window`` can still use: ``min(L, W - 1)``.

    The first decode query (position ``L``) sees keys at positions ``> L - W``: the last ``W - 1``
    prompt tokens and itself; no later query sees more of the prompt. Full attention (None): ``L``.
    """
    return prompt_len if window is None else max(0, min(prompt_len, window - 1))


def cap_sliding(budgets: Sequence[Sequence[int]], windows: Sequence[int | None], prompt_len: int) -> list[list[int]]:
    """Cap sliding-window layers' budgets at :func:`sliding_cap`; give the excess to full-attention heads.

    ``budgets [n_layers][n_kv_heads]`` from a method, ``windows [n_layers]`` (None = full attention).
    The full-attention heads grow in proportion to their budgets, each capped at ``prompt_len``
    (:func:`weighted_budgets` with their old budgets as minimums: exact, largest remainder), so the
    total is unchanged unless every full-attention head reaches ``prompt_len`` or the model has no
    full-attention layer; then the rest cannot be spent and the total is lower.

    Examples
    --------
    >>> cap_sliding([[10, 6], [3, 1]], [8, None], prompt_len=20)
    [[7, 6], [5, 2]]
    """
    out = [list(row) for row in budgets]
    excess = 0
    for layer, window in enumerate(windows):
        cap = sliding_cap(prompt_len, window)
        if window is not None:
            excess += sum(max(0, b - cap) for b in out[layer])
            out[layer] = [min(b, cap) for b in out[layer]]
    full = [(layer, head) for layer, window in enumerate(windows) if window is None for head in range(len(out[layer]))]
    if excess == 0 or not full:
        return out
    current = [out[layer][head] for layer, head in full]
    grown = weighted_budgets(sum(current) + excess, current, [prompt_len] * len(full), current)
    for (layer, head), value in zip(full, grown):
        out[layer][head] = value
    return out


def budget_table(schedule: Callable[[int], list[list[int]]], prompt_lengths: torch.Tensor) -> torch.Tensor:
    """Stack ``schedule(L_b)`` for each batch row: ``LongTensor (B, n_layers, n_kv_heads)`` on the lengths' device.

    ``prompt_lengths``: ``(B,)``. Rows of equal length share one call.
    """
    lengths = [int(x) for x in prompt_lengths.tolist()]
    cache = {length: torch.tensor(schedule(length), dtype=torch.long) for length in set(lengths)}
    return torch.stack([cache[length] for length in lengths]).to(prompt_lengths.device)


def allocate(profile, keep: float, prompt_len: int, weighting: str = "profile", min_tokens: int = 5,
             max_full_share: float = 1.0):
    """Per-head budgets and full-head flags for one prompt length.

    Returns ``(budgets [L][H] int, full [L][H] bool)``. When ``keep`` cannot pay for every full
    head plus ``min_tokens`` per compressed head, full heads are demoted to compressed ones, the
    most stable first (volatile heads before pivots): the fewest demotions that fit. A demoted
    pivot stops monitoring; its satellites then stay static. Demotion continues while full heads
    would take more than ``max_full_share`` of the total (so compressed heads are never starved).
    Heads of sliding-window layers (role ``"sliding"``) are compressed heads with the mean profile
    weight 1, capped at :func:`sliding_cap` (their floor too), so what they cannot hold goes to the
    other compressed heads (docs/DESIGN.md s.2). When even ``min_tokens`` per head does not fit (a short
    prompt), every head is compressed and the floor is cut to ``total // heads``.
    """
    layers, heads = profile.n_layers, profile.n_kv_heads
    n = layers * heads
    total = total_budget(keep, prompt_len, layers, heads)
    windows = profile.layer_windows()
    caps = {(layer, head): sliding_cap(prompt_len, windows[layer]) for layer in range(layers) for head in range(heads)}
    floors = {key: min(min_tokens, cap) for key, cap in caps.items()}
    if total < sum(floors.values()):  # a short prompt: every head compressed, floors cut to what fits
        min_tokens = total // n
        floors = {key: min(min_tokens, cap) for key, cap in caps.items()}
    records = [h for row in profile.heads for h in row]
    full = {(h.layer, h.head) for h in records if h.is_full}
    demote_order = sorted((h for h in records if h.is_full),
                          key=lambda h: (h.role == "pivot", -h.stability, h.layer, h.head))
    for h in demote_order:
        fits = len(full) * prompt_len + sum(f for key, f in floors.items() if key not in full) <= total
        if fits and len(full) * prompt_len <= max_full_share * total:
            break
        full.discard((h.layer, h.head))
    compressed = [h for h in records if (h.layer, h.head) not in full]
    if weighting == "uniform":
        weights = [1.0] * len(compressed)
    elif weighting == "profile":
        # profile weights are M * (1/(S+eps)) / sum(...); demoted full heads have none: give them the
        # same formula on the same scale (the normalising constant of the profile's own weights);
        # sliding heads are not profiled: the mean weight, 1
        scales = [h.weight * (h.stability + EPS) for h in records if h.weight is not None]
        scale = sum(scales) / len(scales) if scales else 1.0
        weights = [h.weight if h.weight is not None else 1.0 if h.role == "sliding" else scale / (h.stability + EPS)
                   for h in compressed]
    else:
        raise ValueError(f"weighting={weighting!r} is invalid; choose 'profile' or 'uniform'")
    keys = [(h.layer, h.head) for h in compressed]
    shares = weighted_budgets(total - len(full) * prompt_len, weights, [caps[k] for k in keys],
                              [floors[k] for k in keys]) if compressed else []
    budgets = [[prompt_len] * heads for _ in range(layers)]
    is_full = [[(layer, head) in full for head in range(heads)] for layer in range(layers)]
    for h, share in zip(compressed, shares):
        budgets[h.layer][h.head] = share
    return budgets, is_full
