"""Budget accounting (docs/DESIGN.md section 2): exact totals, bounds, water-filling by hand."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from heterocache.budget import (
    budget_table,
    cap_sliding,
    pyramid_budgets,
    sliding_cap,
    split_evenly,
    total_budget,
    uniform_budgets,
    validate_keep,
    water_fill,
    weighted_budgets,
)

KEEPS = [0.01, 0.1, 0.25, 1 / 3, 0.5, 0.77, 1.0]
SHAPES = [(97, 4, 2), (5, 3, 8), (1000, 30, 3), (33, 1, 1), (40, 7, 2)]  # (prompt_len, layers, kv heads)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.0001, float("nan"), float("inf"), "half", None])
def test_keep_outside_range_is_rejected(keep):
    with pytest.raises(ValueError, match=r"keep.*\(0, 1\]"):
        validate_keep(keep)
    with pytest.raises(ValueError, match="keep"):
        uniform_budgets(keep, 10, 2, 2)


@pytest.mark.parametrize("keep", [True, False, np.True_, torch.tensor(True)])
def test_keep_refuses_booleans(keep):
    """``True`` is an int (1) in Python: it must not pass as keep 1.0."""
    with pytest.raises(ValueError, match="boolean"):
        validate_keep(keep)
    assert validate_keep(1) == 1.0 and validate_keep("0.25") == 0.25 and validate_keep(np.float32(0.5)) == 0.5


def test_total_budget_rounds():
    assert total_budget(0.5, 97, 4, 2) == 388
    assert total_budget(0.1, 97, 3, 1) == round(29.1)
    assert total_budget(1.0, 97, 4, 2) == 97 * 8


@pytest.mark.parametrize("prompt_len,n_layers,n_kv", SHAPES)
@pytest.mark.parametrize("keep", KEEPS)
def test_uniform_sums_exactly_and_is_bounded(keep, prompt_len, n_layers, n_kv):
    budgets = uniform_budgets(keep, prompt_len, n_layers, n_kv)
    flat = [b for layer in budgets for b in layer]
    assert len(budgets) == n_layers and all(len(layer) == n_kv for layer in budgets)
    assert sum(flat) == total_budget(keep, prompt_len, n_layers, n_kv)
    assert max(flat) - min(flat) <= 1 and max(flat) <= prompt_len and min(flat) >= 0
    assert flat == sorted(flat, reverse=True)  # remainder handed out layer-major from the start


def test_uniform_remainder_goes_layer_major():
    # 0.1 * 97 * 3 * 2 = 58.2 -> 58 over 6 heads: 10, 10, 10, 10, 9, 9
    assert uniform_budgets(0.1, 97, 3, 2) == [[10, 10], [10, 10], [9, 9]]


@pytest.mark.parametrize("prompt_len,n_layers,n_kv", SHAPES)
@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("window", [0, 8, 32])
def test_pyramid_exact_bounded_decreasing(keep, prompt_len, n_layers, n_kv, window):
    budgets = pyramid_budgets(keep, prompt_len, n_layers, n_kv, window)
    flat = [b for layer in budgets for b in layer]
    assert sum(flat) == total_budget(keep, prompt_len, n_layers, n_kv)
    assert max(flat) <= prompt_len and min(flat) >= 0
    layer_totals = [sum(layer) for layer in budgets]
    assert layer_totals == sorted(layer_totals, reverse=True)
    if keep * prompt_len >= window + 1:  # no degeneration: every head keeps at least its window
        assert min(flat) >= min(window, prompt_len)
    if keep == 1.0:
        assert flat == [prompt_len] * len(flat)


def test_pyramid_matches_hand_schedule():
    # L=1000, keep=0.2 -> C=200, w=32, beta=20: C-w=168, m_min=8.4, m_max=327.6 < 968;
    # step 319.2 / 3 = 106.4: b = 327.6, 221.2, 114.8, 8.4; + window = 359.6, 253.2, 146.8, 40.4;
    # floors sum to 798, the 2 left go to the largest fractions (.8, .6)
    assert pyramid_budgets(0.2, 1000, 4, 1, 32) == [[360], [253], [147], [40]]
    # two heads: prefix entries 655.2, 442.4, 229.6, 16.8 -> 655, 442, 230, 17 (+64 window), split evenly
    assert pyramid_budgets(0.2, 1000, 4, 2, 32) == [[360, 359], [253, 253], [147, 147], [41, 40]]


def test_pyramid_caps_at_prompt_length_and_redistributes():
    # keep=0.9: m_max would exceed L - w, so it is capped there and the schedule flattens
    budgets = pyramid_budgets(0.9, 100, 5, 2, 32)
    assert max(b for layer in budgets for b in layer) <= 100
    assert sum(map(sum, budgets)) == total_budget(0.9, 100, 5, 2)
    assert budgets[0] == [100, 100]


def test_pyramid_degenerates_to_uniform_below_window():
    assert pyramid_budgets(0.1, 97, 4, 2, 32) == uniform_budgets(0.1, 97, 4, 2)


@pytest.mark.parametrize("prompt_len,n_layers,n_kv", SHAPES)
def test_monotonic_in_keep(prompt_len, n_layers, n_kv):
    for schedule in (uniform_budgets, lambda *a: pyramid_budgets(*a, window=8)):
        previous = -1
        for keep in KEEPS:
            total = sum(map(sum, schedule(keep, prompt_len, n_layers, n_kv)))
            assert total >= previous
            previous = total


def test_weighted_hand_cases():
    # x = lam * w clamped: lam = 8/3 -> [8/3, 2 (cap), 16/3]; floors 2, 2, 5; remainder to 2/3
    assert water_fill(10, [1, 1, 2], [10, 2, 10]) == [Fraction(8, 3), Fraction(2), Fraction(16, 3)]
    assert weighted_budgets(10, [1, 1, 2], caps=[10, 2, 10]) == [3, 2, 5]
    # equal weights, ties broken by index
    assert weighted_budgets(10, [1, 1, 1], caps=[10, 10, 10]) == [4, 3, 3]
    # total above sum of caps: everything capped
    assert weighted_budgets(100, [1, 2, 3], caps=[5, 6, 7]) == [5, 6, 7]
    # minimum: lam * [1, 9] for total 20 with min 5 -> [5, 15]
    assert weighted_budgets(20, [1, 9], caps=[20, 20], minimum=5) == [5, 15]
    # two caps binding in sequence: 30 over [1, 2, 4] caps [100, 5, 10] -> 10 (cap), 5 (cap), 15
    assert weighted_budgets(30, [1, 2, 4], caps=[100, 5, 10]) == [15, 5, 10]
    # zero weights get their minimum unless the weighted items are full
    assert weighted_budgets(6, [0, 1, 0], caps=[4, 4, 4], minimum=[1, 0, 1]) == [1, 4, 1]
    assert weighted_budgets(10, [0, 1, 0], caps=[4, 4, 4]) == [3, 4, 3]
    assert weighted_budgets(5, [0, 0], caps=[10, 10]) == [3, 2]
    assert weighted_budgets(0, [1, 2], caps=[3, 3]) == [0, 0]


def test_weighted_errors():
    with pytest.raises(ValueError, match="minimum"):
        weighted_budgets(3, [1, 1], caps=[5, 5], minimum=2)
    with pytest.raises(ValueError, match="exceeds caps"):
        weighted_budgets(3, [1, 1], caps=[1, 5], minimum=[2, 0])
    with pytest.raises(ValueError, match="weights"):
        weighted_budgets(3, [1, -1], caps=[5, 5])
    with pytest.raises(ValueError, match="weights"):
        weighted_budgets(3, [1, math.nan], caps=[5, 5])
    with pytest.raises(ValueError, match="same length"):
        weighted_budgets(3, [1, 1], caps=[5])


def test_weighted_random_properties():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 12, (1,), generator=generator))
        weights = (torch.rand(n, generator=generator) ** 3).tolist()
        caps = torch.randint(0, 50, (n,), generator=generator).tolist()
        minimum = [min(c, int(m)) for c, m in zip(caps, torch.randint(0, 5, (n,), generator=generator))]
        total = sum(minimum) + int(torch.randint(0, 300, (1,), generator=generator))
        got = weighted_budgets(total, weights, caps, minimum)
        assert sum(got) == min(total, sum(caps))
        assert all(m <= g <= c for m, g, c in zip(minimum, got, caps))
        exact = water_fill(total, weights, caps, minimum)
        assert all(abs(g - x) < 1 for g, x in zip(got, exact))
        # proportionality: an item strictly inside its bounds has the largest weight-normalised level
        free = [i for i in range(n) if minimum[i] < exact[i] < caps[i]]
        if len(free) > 1:
            levels = {exact[i] / Fraction(weights[i]) for i in free}
            assert len(levels) == 1


def test_split_evenly_and_budget_table():
    assert split_evenly(7, 3) == [3, 2, 2]
    lengths = torch.tensor([97, 84, 97])
    table = budget_table(lambda n: uniform_budgets(0.5, n, 4, 2), lengths)
    assert table.shape == (3, 4, 2) and table.dtype == torch.long
    assert table[1].sum() == total_budget(0.5, 84, 4, 2)
    torch.testing.assert_close(table[0], table[2])


def test_sliding_cap_is_the_last_window_minus_one_tokens():
    assert sliding_cap(53, None) == 53
    assert sliding_cap(53, 8) == 7  # the first decode query (position 53) sees 46..53: 7 prompt tokens
    assert sliding_cap(5, 8) == 5
    assert sliding_cap(53, 1) == 0


def test_cap_sliding_by_hand():
    # layer 0 slides (cap 7): 10 -> 7 frees 3; full heads 3 and 1 grow in proportion: 7 * 3/4 = 5.25,
    # 7 * 1/4 = 1.75 -> floors 5, 1, the remaining token to the larger remainder (1.75)
    assert cap_sliding([[10, 6], [3, 1]], [8, None], prompt_len=20) == [[7, 6], [5, 2]]
    # a full head already at the prompt length takes nothing; the other gets all of the excess
    assert cap_sliding([[10, 9], [20, 4]], [8, None], prompt_len=20) == [[7, 7], [20, 9]]
    # every full head saturated: the excess cannot be spent, the total falls
    assert cap_sliding([[10, 6], [19, 20]], [8, None], prompt_len=20) == [[7, 6], [20, 20]]
    # all layers slide (Mistral): no full-attention head to receive it
    assert cap_sliding([[10, 6], [3, 1]], [8, 8], prompt_len=20) == [[7, 6], [3, 1]]
    # nothing above the cap: unchanged
    assert cap_sliding([[5, 6], [3, 1]], [8, None], prompt_len=20) == [[5, 6], [3, 1]]


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("windows", [[4, None, 4, None], [None, None, 16, 16], [8, 8, 8, 8], [2, None, 200, None]])
def test_cap_sliding_keeps_the_total_when_it_can(keep, windows):
    prompt_len, n_kv = 97, 3
    for budgets in (uniform_budgets(keep, prompt_len, 4, n_kv), pyramid_budgets(keep, prompt_len, 4, n_kv, 8)):
        capped = cap_sliding(budgets, windows, prompt_len)
        caps = [sliding_cap(prompt_len, w) for w in windows]
        for layer, row in enumerate(capped):
            assert all(0 <= b <= caps[layer] for b in row)
            if windows[layer] is None:  # full-attention heads only grow
                assert all(b >= old for b, old in zip(row, budgets[layer]))
        total = sum(map(sum, budgets))
        full_room = sum(caps[layer] * n_kv for layer, w in enumerate(windows) if w is None)
        kept_sliding = sum(sum(row) for layer, row in enumerate(capped) if windows[layer] is not None)
        assert sum(map(sum, capped)) == min(total, full_room + kept_sliding)
