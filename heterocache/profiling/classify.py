"""Head classification from top-k sets (spec/heterocache.md s.3-5): small pure functions.

Sets are boolean masks over prompt positions, ``(..., T)``. ``H`` = KV heads of one layer,
``L`` = layers, ``S`` = decode steps, ``B`` = batch rows (statistics are batch means).

Adaptive thresholds (beyond the paper) are given as strings:

- ``"auto"`` / ``"otsu"``: Otsu's split of the pooled scores (all heads' stabilities, or all
  within-layer head-pair similarities of the model): the cut that maximises the between-class
  variance of the two groups it makes, placed halfway between the two values it separates. It
  follows the model's own distribution and needs no target fraction; with fewer than two distinct
  values there is nothing to split and the paper's default 0.5 is used.
- ``"quantile:Q"``: the ``Q``-quantile of the pooled scores (``stable``: about a fraction ``Q`` of
  heads become volatile; ``sim``: about ``1 - Q`` of head pairs are linked).
- ``"layer-quantile:Q"`` (similarity only): the ``Q``-quantile of each layer's own pairs.
"""

from __future__ import annotations

import torch

DEFAULT_THRESHOLD = 0.5
EPS = 1e-6


def indices_to_mask(indices: torch.Tensor, length: int) -> torch.Tensor:
    """Index sets ``(..., k)`` -> boolean masks ``(..., length)``."""
    mask = torch.zeros(*indices.shape[:-1], length, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices.long(), True)


def set_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a & b| / |a|`` over the last axis of boolean masks ``(..., T)``; 0 where ``a`` is empty."""
    size = a.sum(-1)
    inter = (a & b).sum(-1)
    return torch.where(size > 0, inter / size.clamp(min=1), torch.zeros((), dtype=torch.float32)).float()


def step_overlaps(prefill: torch.Tensor, decode: torch.Tensor) -> torch.Tensor:
    """Per-step overlap with the prefill set, batch mean: ``(B, H, T)``, ``(S, B, H, T)`` -> ``(S, H)``."""
    return set_overlap(prefill.unsqueeze(0), decode).mean(dim=1)


def median(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """NumPy-style median (mean of the two middle values for an even count) along ``dim``."""
    return torch.quantile(values.float(), 0.5, dim=dim)


def stability(overlaps: torch.Tensor) -> torch.Tensor:
    """``S_h`` = median over decode steps: ``(S, ...)`` -> ``(...)``; zeros when ``S == 0``."""
    if overlaps.shape[0] == 0:
        return torch.zeros(overlaps.shape[1:])
    return median(overlaps, dim=0)


def temporal_labels(stabilities: torch.Tensor, threshold: float) -> list:
    """``"anchor"`` where ``S >= threshold`` else ``"volatile"``; nested lists shaped like the input."""
    labels = torch.where(stabilities >= threshold, 1, 0).tolist()

    def name(x):
        return [name(v) for v in x] if isinstance(x, list) else ("anchor" if x else "volatile")

    return name(labels)


def pairwise_similarity(sets: torch.Tensor) -> torch.Tensor:
    """``sim[i, j] = |S_i & S_j| / |S_i|``, batch mean: ``(B, H, T)`` -> ``(H, H)`` (diagonal 1)."""
    sets_f = sets.float()
    inter = torch.matmul(sets_f, sets_f.transpose(-1, -2))  # (B, H, H)
    size = sets_f.sum(-1, keepdim=True)
    sim = torch.where(size > 0, inter / size.clamp(min=1), torch.zeros(()))
    return sim.mean(0)


def decode_median_similarity(decode_sets: torch.Tensor) -> torch.Tensor:
    """Paper-style similarity: elementwise median over decode steps, ``(S, B, H, T)`` -> ``(H, H)``."""
    if decode_sets.shape[0] == 0:
        raise ValueError('similarity="decode_median" needs decode steps (max_new_tokens >= 2)')
    return median(torch.stack([pairwise_similarity(s) for s in decode_sets]), dim=0)


def similarity_graph(sim: torch.Tensor, threshold: float) -> torch.Tensor:
    """Adjacency ``(H, H)`` bool: ``sim >= threshold`` (inclusive), symmetrised, no self loops."""
    adjacency = sim >= threshold
    adjacency = adjacency | adjacency.T
    adjacency.fill_diagonal_(False)
    return adjacency


def star_clusters(adjacency: torch.Tensor) -> dict[int, list[int]]:
    """Greedy star clustering of one layer (spec s.4.2), returned keyed by pivot id (ascending).

    Repeatedly take the unassigned head with the most unassigned neighbours (ties: smallest index);
    stop when that count is 0; it becomes a pivot and its unassigned neighbours (ascending) its
    satellites. ``adjacency``: ``(H, H)`` bool, symmetric, no self loops.
    """
    adj = adjacency.bool().tolist()
    unassigned = set(range(len(adj)))
    stars: dict[int, list[int]] = {}
    while unassigned:
        degree = {u: sum(1 for v in unassigned if adj[u][v]) for u in unassigned}
        pivot = min(unassigned, key=lambda u: (-degree[u], u))
        if degree[pivot] == 0:
            break
        satellites = sorted(v for v in unassigned if adj[pivot][v])
        stars[pivot] = satellites
        unassigned -= {pivot, *satellites}
    return dict(sorted(stars.items()))


def final_roles(temporal: list[str], stars: dict[int, list[int]]) -> tuple[list[str], list[int | None]]:
    """Precedence pivot > satellite > temporal label for one layer -> ``(roles, pivot_of)``.

    ``pivot_of[h]`` is the pivot's head index for a satellite, ``None`` otherwise.
    """
    roles = list(temporal)
    pivot_of: list[int | None] = [None] * len(temporal)
    for pivot, satellites in stars.items():
        roles[pivot] = "pivot"
        for head in satellites:
            roles[head] = "satellite"
            pivot_of[head] = pivot
    return roles, pivot_of


def allocation_weights(stabilities: list[list[float]], roles: list[list[str]],
                       eps: float = EPS) -> list[list[float | None]]:
    """``w_h = M * (1/(S_h+eps)) / sum_C 1/(S_j+eps)`` over ``C`` = anchors + satellites of the model.

    Mean 1 over ``C``; less stable heads get more. Full heads (volatile, pivot) get ``None``.
    """
    compressed = [(layer, head) for layer, row in enumerate(roles)
                  for head, role in enumerate(row) if role in ("anchor", "satellite")]
    inverse = {lh: 1.0 / (stabilities[lh[0]][lh[1]] + eps) for lh in compressed}
    total = sum(inverse.values())
    weights: list[list[float | None]] = [[None] * len(row) for row in roles]
    for (layer, head), inv in inverse.items():
        weights[layer][head] = len(compressed) * inv / total
    return weights


def otsu_threshold(values: torch.Tensor) -> float | None:
    """Otsu's two-class split of 1-D ``values``: midpoint of the best cut, or None if < 2 distinct values."""
    v = torch.sort(values.flatten().double()).values
    n = v.numel()
    best, best_score = None, -1.0
    prefix = torch.cumsum(v, 0)
    total = float(prefix[-1]) if n else 0.0
    for i in range(1, n):
        if v[i] == v[i - 1]:
            continue
        mean_low = float(prefix[i - 1]) / i
        mean_high = (total - float(prefix[i - 1])) / (n - i)
        score = (i / n) * (1 - i / n) * (mean_high - mean_low) ** 2
        if score > best_score + 1e-15:
            best, best_score = 0.5 * float(v[i - 1] + v[i]), score
    return best


def parse_threshold(value: float | str, name: str, allow_layer: bool = False) -> tuple[str, float | None]:
    """Validate a threshold option -> ``(rule, parameter)``; rule in fixed/otsu/quantile/layer-quantile.

    Numeric strings (``"0.4"``, as a command line passes them) count as fixed values.
    """
    allowed = 'a float in [0, 1], "auto", "otsu", "quantile:Q"' + (', "layer-quantile:Q"' if allow_layer else "")
    rule, number = None, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rule, number = "fixed", float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        rules = ("quantile", "layer-quantile") if allow_layer else ("quantile",)
        head, _, tail = text.partition(":")
        if text in ("auto", "otsu"):
            return "otsu", None
        if head in rules and tail:
            rule, text = head, tail
        try:
            number = float(text)
            rule = rule or "fixed"
        except ValueError:
            rule = None
    if rule is None:
        raise ValueError(f"{name}={value!r} is invalid; use {allowed}")
    if not 0.0 <= number <= 1.0:  # also rejects NaN
        what = "the quantile" if rule != "fixed" else "the threshold"
        raise ValueError(f"{name}={value!r}: {what} must be in [0, 1]; use {allowed}")
    return rule, number


def resolve_stable_threshold(value: float | str, stabilities: torch.Tensor) -> tuple[float, str]:
    """Numeric stability threshold and the rule used, from ``value`` and all heads' ``S`` ``(L, H)``."""
    rule, param = parse_threshold(value, "stable_threshold")
    if rule == "fixed":
        return param, "fixed"
    if rule == "quantile":
        return float(torch.quantile(stabilities.flatten().float(), param)), f"quantile:{param:g}"
    cut = otsu_threshold(stabilities)
    return (cut, "otsu") if cut is not None else (DEFAULT_THRESHOLD, "otsu-fallback-0.5")


def _pairs(sim: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.triu_indices(sim.shape[0], sim.shape[1], offset=1)
    return sim[rows, cols]


def resolve_sim_threshold(value: float | str, sims: list[torch.Tensor]) -> tuple[list[float | None], str]:
    """Per-layer similarity thresholds and the rule, from ``value`` and each layer's ``(H, H)`` matrix.

    Model-wide rules give the same number for every layer; a layer with one head has no pairs and
    gets ``None`` under ``layer-quantile``.
    """
    rule, param = parse_threshold(value, "sim_threshold", allow_layer=True)
    if rule == "fixed":
        return [param] * len(sims), "fixed"
    if rule == "layer-quantile":
        return [float(torch.quantile(_pairs(s).float(), param)) if s.shape[0] > 1 else None
                for s in sims], f"layer-quantile:{param:g}"
    pooled = torch.cat([_pairs(s).flatten() for s in sims]) if sims else torch.zeros(0)
    if rule == "quantile":
        cut = float(torch.quantile(pooled.float(), param)) if pooled.numel() else DEFAULT_THRESHOLD
        return [cut] * len(sims), f"quantile:{param:g}"
    cut = otsu_threshold(pooled)
    if cut is None:
        return [DEFAULT_THRESHOLD] * len(sims), "otsu-fallback-0.5"
    return [cut] * len(sims), "otsu"
