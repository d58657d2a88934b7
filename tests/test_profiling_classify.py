"""Classification on hand-made sets and matrices with known answers (spec/heterocache.md s.3-5)."""

from __future__ import annotations

import pytest
import torch

from heterocache.profiling import classify as cl
from heterocache.profiling.api import classify_capture
from heterocache.profiling.capture import CaptureResult


def sets(*index_lists, length=10):
    return cl.indices_to_mask(torch.tensor(index_lists), length)


def adjacency(n, edges):
    adj = torch.zeros(n, n, dtype=torch.bool)
    for i, j in edges:
        adj[i, j] = adj[j, i] = True
    return adj


def test_overlap_and_stability_median():
    prefill = sets([0, 1, 2, 3]).unsqueeze(0)  # (B=1, H=1, T)
    decode = torch.stack([sets([0, 1, 2, 3]), sets([0, 1, 8, 9]), sets([5, 6, 7, 8]), sets([0, 1, 2, 9])])
    overlaps = cl.step_overlaps(prefill, decode.unsqueeze(1))  # (S, H)
    assert overlaps[:, 0].tolist() == [1.0, 0.5, 0.0, 0.75]
    assert cl.stability(overlaps).tolist() == [0.625]  # numpy median: mean of 0.5 and 0.75
    assert cl.stability(torch.zeros(0, 3)).tolist() == [0.0, 0.0, 0.0]  # no decode data -> 0
    empty = torch.zeros(1, 1, 10, dtype=torch.bool)
    assert cl.set_overlap(empty, prefill).item() == 0.0


def test_overlap_is_batch_mean():
    prefill = torch.stack([sets([0, 1]), sets([2, 3])])  # (B=2, H=1, T)
    decode = torch.stack([sets([0, 1]), sets([4, 5])]).unsqueeze(0)  # (S=1, B=2, H=1, T)
    assert cl.step_overlaps(prefill, decode).tolist() == [[0.5]]


def test_temporal_labels_inclusive():
    labels = cl.temporal_labels(torch.tensor([[0.5, 0.49], [1.0, 0.0]]), 0.5)
    assert labels == [["anchor", "volatile"], ["anchor", "volatile"]]


def test_pairwise_similarity_and_graph():
    layer = sets([0, 1, 2, 3], [0, 1, 4, 5], [6, 7, 8, 9]).unsqueeze(0)
    sim = cl.pairwise_similarity(layer)
    assert sim.tolist() == [[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]
    graph = cl.similarity_graph(sim, 0.5)  # inclusive: 0.5 links heads 0 and 1
    assert graph.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    assert not cl.similarity_graph(sim, 0.51).any()


def test_decode_median_similarity():
    steps = torch.stack([sets([0, 1], [0, 1]), sets([0, 1], [0, 2]), sets([0, 1], [2, 3])]).unsqueeze(1)
    assert cl.decode_median_similarity(steps)[0, 1].item() == 0.5
    with pytest.raises(ValueError, match="decode steps"):
        cl.decode_median_similarity(steps[:0])


def test_star_largest_degree_first_and_pivot_keys():
    # 6 has degree 3 (2, 3, 4); then 0 with degree 1 (1); 5 isolated
    adj = adjacency(7, [(6, 2), (6, 3), (6, 4), (0, 1), (2, 3)])
    stars = cl.star_clusters(adj)
    assert stars == {0: [1], 6: [2, 3, 4]}
    assert list(stars) == [0, 6]  # keyed by pivot id, not discovery order (pitfall 1)


def test_star_ties_go_to_smallest_index_and_stop_at_degree_zero():
    # a path 0-1-2-3: degrees 1, 2, 2, 1 -> pivot 1 (tie with 2) takes 0 and 2; 3 is left alone
    # (its only neighbour was taken), so it stays unique even though it has an edge
    assert cl.star_clusters(adjacency(4, [(0, 1), (1, 2), (2, 3)])) == {1: [0, 2]}
    # a triangle: all degree 2 -> head 0 is the pivot, satellites ascending
    assert cl.star_clusters(adjacency(3, [(2, 1), (0, 2), (0, 1)])) == {0: [1, 2]}
    # two disjoint edges, equal degree: smaller pivot first, each star separate
    assert cl.star_clusters(adjacency(4, [(2, 3), (0, 1)])) == {0: [1], 2: [3]}
    assert cl.star_clusters(adjacency(3, [])) == {}  # all singletons


def test_precedence_pivot_then_satellite_then_temporal():
    temporal = ["volatile", "anchor", "volatile", "anchor"]
    roles, pivot_of = cl.final_roles(temporal, {1: [2]})
    assert roles == ["volatile", "pivot", "satellite", "anchor"]
    assert pivot_of == [None, None, 1, None]
    # a volatile head can be a pivot; its temporal label is kept apart in the profile
    roles, _ = cl.final_roles(["volatile", "volatile"], {0: [1]})
    assert roles == ["pivot", "satellite"]


def test_allocation_weights_mean_one_and_order():
    stab = [[0.9, 0.3, 0.0], [0.6, 0.1, 0.2]]
    roles = [["anchor", "satellite", "pivot"], ["satellite", "volatile", "anchor"]]
    weights = cl.allocation_weights(stab, roles)
    assert weights[0][2] is None and weights[1][1] is None
    compressed = [w for row in weights for w in row if w is not None]
    assert sum(compressed) / len(compressed) == pytest.approx(1.0)
    inverse = [1 / (s + cl.EPS) for s in (0.9, 0.3, 0.6, 0.2)]
    assert weights[0][0] == pytest.approx(4 * inverse[0] / sum(inverse))
    # less stable -> more budget
    assert weights[1][2] > weights[0][1] > weights[1][0] > weights[0][0]


def test_otsu_and_quantile_thresholds():
    values = torch.tensor([0.1, 0.12, 0.15, 0.8, 0.85, 0.9])
    assert cl.otsu_threshold(values) == pytest.approx(0.475)
    assert cl.otsu_threshold(torch.tensor([0.3, 0.3])) is None
    stab = torch.tensor([[0.2, 0.25, 0.7], [0.75, 0.8, 0.85]])
    value, rule = cl.resolve_stable_threshold("auto", stab)
    assert rule == "otsu" and value == pytest.approx(0.475)
    assert cl.temporal_labels(stab, value)[0] == ["volatile", "volatile", "anchor"]
    value, rule = cl.resolve_stable_threshold("quantile:0.25", torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))
    assert (value, rule) == (pytest.approx(0.2), "quantile:0.25")
    assert cl.resolve_stable_threshold("auto", torch.full((2, 2), 0.7)) == (0.5, "otsu-fallback-0.5")
    assert cl.resolve_stable_threshold("0.4", stab) == (0.4, "fixed")


def test_sim_thresholds_model_wide_and_per_layer():
    def sim(a, b, c):  # symmetric 3x3 with pairs (0,1)=a, (0,2)=b, (1,2)=c
        return torch.tensor([[1.0, a, b], [a, 1.0, c], [b, c, 1.0]])

    sims = [sim(0.9, 0.1, 0.2), sim(0.15, 0.8, 0.05)]
    values, rule = cl.resolve_sim_threshold("auto", sims)
    assert rule == "otsu" and values == [pytest.approx(0.5), pytest.approx(0.5)]
    values, rule = cl.resolve_sim_threshold("layer-quantile:1.0", sims)
    assert values == [pytest.approx(0.9), pytest.approx(0.8)] and rule == "layer-quantile:1"
    values, _ = cl.resolve_sim_threshold("quantile:0.5", sims)
    assert values[0] == pytest.approx(0.175)
    assert cl.resolve_sim_threshold("layer-quantile:0.5", [torch.ones(1, 1)])[0] == [None]


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "sometimes", "quantile:2", "quantile:x", True, None])
def test_threshold_validation(bad):
    with pytest.raises(ValueError, match="stable_threshold"):
        cl.parse_threshold(bad, "stable_threshold")


def test_layer_quantile_only_for_similarity():
    with pytest.raises(ValueError, match="stable_threshold"):
        cl.parse_threshold("layer-quantile:0.5", "stable_threshold")
    assert cl.parse_threshold("layer-quantile:0.5", "sim_threshold", allow_layer=True) == ("layer-quantile", 0.5)


def test_classify_capture_end_to_end():
    """One layer, 4 heads, T = 10, k = 4, prefill + 2 decode steps; every role appears."""
    prefill = [[0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 5, 6], [6, 7, 8, 9]]
    step1 = [[0, 1, 2, 3], [5, 6, 7, 8], [0, 1, 5, 6], [0, 1, 2, 3]]
    step2 = [[0, 1, 2, 9], [5, 6, 7, 9], [0, 1, 5, 7], [0, 1, 2, 4]]
    indices = torch.tensor([prefill, step1, step2], dtype=torch.int32)[None, :, None]  # (L, S, B, H, k)
    result = CaptureResult(topk_indices=indices, prompt_len=10, topk=4, generated=torch.zeros(1, 3))
    heads, info = classify_capture(result, stable_threshold=0.5, sim_threshold=0.5)
    # stability: h0 median(1, .75) = .875; h1 median(0, 0) = 0; h2 median(1, .75) = .875; h3 0
    assert [h.stability for h in heads[0]] == [0.875, 0.0, 0.875, 0.0]
    # prefill sims: (0,1) = .75, (0,2) = .5, (1,2) = .5, head 3 with 0..2 <= .25 -> 0 pivot of 1, 2
    assert [h.role for h in heads[0]] == ["pivot", "satellite", "satellite", "volatile"]
    assert [h.labels for h in heads[0]] == [("anchor", "pivot"), ("volatile", "satellite"),
                                            ("anchor", "satellite"), ("volatile", None)]
    assert [h.pivot for h in heads[0]] == [None, 0, 0, None]
    weights = [h.weight for h in heads[0]]
    assert weights[0] is None and weights[3] is None
    assert weights[1] + weights[2] == pytest.approx(2.0) and weights[1] > weights[2]
    assert info["stable_threshold_value"] == 0.5 and info["sim_threshold_value"] == 0.5
    heads, _ = classify_capture(result, sim_threshold=0.8)  # no edges: temporal labels decide
    assert [h.role for h in heads[0]] == ["anchor", "volatile", "anchor", "volatile"]
    heads, _ = classify_capture(result, sim_threshold=0.5, similarity="decode_median")
    # decode median sims: (0,1) .125, (0,2) .5, (0,3) .875, (1,2) .5, (1,3) 0, (2,3) .5 -> head 2 has
    # degree 3 and takes everyone
    assert [h.role for h in heads[0]] == ["satellite", "satellite", "pivot", "satellite"]
