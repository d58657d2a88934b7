"""OmniKV's layer roles and budgets for one prompt length (see ``method.py``: the roles, the shedding order)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from heterocache.budget import sliding_cap, split_evenly, total_budget

DEPTHS = (1 / 16, 1 / 4, 9 / 16)  # published {2, 8, 18} of Llama-3-8B's 32 layers, as depth fractions


def default_filter_layers(n_layers: int) -> list[int]:
    """Filter layers by depth fraction ``{1/16, 1/4, 9/16}`` of ``n_layers``, rounded (half to even),
    duplicates merged: 32 -> [2, 8, 18] (published for Llama-3-8B), 30 -> [2, 8, 17], 24 -> [2, 6, 14]."""
    return sorted({min(n_layers - 1, round(f * n_layers)) for f in DEPTHS})


@dataclass
class Plan:
    """The resolved layout of one prompt length: a role and budgets per layer."""

    roles: list[str]  # "dense", "filter", "wait", "snap", "sparse", "static", "sliding"
    budgets: list[list[int]]
    source: list[int | None]  # sparse layers: the filter layer that chooses their tokens
    k: int = 0  # the smallest sparse head budget (0: no retrieval)
    shed: list[str] = field(default_factory=list)  # what was given up, in order

    def layers(self, *roles: str) -> list[int]:
        return [layer for layer, role in enumerate(self.roles) if role in roles]


def fill(total: int, caps: list[int]) -> list[int]:
    """``total`` split as evenly as ``caps`` allow (layer-major remainder; a capped item gives its excess to
    the others): ``min(total, sum(caps))`` in all."""
    out, free, left = [0] * len(caps), list(range(len(caps))), total
    while free and left > 0:
        share = split_evenly(left, len(free))
        capped = [i for i, s in zip(free, share) if s >= caps[i]]
        if not capped:
            for i, s in zip(free, share):
                out[i] = s
            break
        for i in capped:
            out[i] = caps[i]
            left -= caps[i]
        free = [i for i in free if i not in capped]
    return out


def resolve_plan(windows: list[int | None], n_kv_heads: int, keep: float, prompt_len: int, filters: list[int],
                 wait_layers: int, min_k: float) -> Plan:
    """OmniKV's roles and budgets for one prompt length (see the module): the published layout, shed
    in the documented order until the sparse heads get at least ``min_k`` tokens (``< 1``: a fraction
    of the prompt, at least 2; else a count), or the static fallback."""
    n_layers, heads, length = len(windows), n_kv_heads, prompt_len
    total = total_budget(keep, length, n_layers, heads)
    full = [layer for layer, window in enumerate(windows) if window is None]
    share = total // (n_layers * heads)
    sliding = {layer: min(share, sliding_cap(length, w)) for layer, w in enumerate(windows) if w is not None}
    rest = total - heads * sum(sliding.values())

    def build(roles: list[str], per_head: list[int], source: list[int | None], k: int, shed: list[str]) -> Plan:
        spread, budgets = iter(per_head), []
        for layer, role in enumerate(roles):
            if role == "sliding":
                budgets.append([sliding[layer]] * heads)
            elif role in ("dense", "filter", "wait"):
                budgets.append([length] * heads)
            else:
                budgets.append([next(spread) for _ in range(heads)])
        spent = sum(map(sum, budgets))
        if spent < total and sliding:  # the other heads are full: the sliding heads take what they can hold
            grown = fill(total - spent + heads * sum(sliding.values()),
                         [sliding_cap(length, windows[layer]) for layer in sliding for _ in range(heads)])
            for index, layer in enumerate(sliding):
                budgets[layer] = grown[index * heads:(index + 1) * heads]
        return Plan(roles, budgets, source, k, shed)

    base = ["sliding" if w is not None else "dense" for w in windows]
    if keep >= 1.0 or not full:
        return build(base, [], [None] * n_layers, 0, [])
    need = max(2, math.ceil(min_k * length)) if min_k < 1 else math.ceil(min_k)
    stages = [(list(filters), wait_layers, False, [])]
    if wait_layers:
        stages.append((list(filters), 0, False, ["wait"]))
    shed_pre = ["wait"] * bool(wait_layers)
    if any(layer < filters[0] for layer in full):
        shed_pre.append("dense-before-filter")
        stages.append((list(filters), 0, True, shed_pre))
    for count in range(len(filters) - 1, 0, -1):
        stages.append((filters[:count], 0, True, [*shed_pre, *[f"filter {f}" for f in filters[count:][::-1]]]))
    for chosen, wait, snap, shed in stages:
        roles = list(base)
        for index, layer in enumerate(full):
            if layer < chosen[0]:
                roles[layer] = "snap" if snap else "dense"
            elif layer in chosen:
                roles[layer] = "filter"
            elif any(f in chosen for f in full[max(0, index - wait):index]):
                roles[layer] = "wait"
            else:
                roles[layer] = "sparse"
        equal = [layer for layer, role in enumerate(roles) if role in ("snap", "sparse")]
        if not any(role == "sparse" for role in roles):
            continue
        left = rest - heads * length * sum(role in ("dense", "filter", "wait") for role in roles)
        if left < 0:
            continue
        per_head = fill(left, [length] * (len(equal) * heads))
        k = min(per_head)
        if k < min(need, length):
            continue
        source: list[int | None] = [None] * n_layers
        for layer, role in enumerate(roles):
            if role == "sparse":
                source[layer] = max(f for f in chosen if f < layer)
        return build(roles, per_head, source, k, shed)
    roles = ["sliding" if w is not None else "static" for w in windows]
    return build(roles, fill(rest, [length] * (len(full) * heads)), [None] * n_layers, 0, ["retrieval"])
