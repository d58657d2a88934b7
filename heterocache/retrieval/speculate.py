"""Speculative refill: each layer's pages chosen one layer early (InfiniGen's speculation, Lee et al., 2024).

When decoder layer l starts a decode step, its input hidden state ``x`` is known; layer l+1's query is
estimated as layer l+1 would compute it from ``x`` (its input norm, q projection, the optional
per-head q norm, and the step's rotary embedding), and layer l+1's dynamic slots are refilled with
the pages that speculated query points at, under the same drift gate. The bytes of that refill are
*prefetched* (issued a whole layer before the attention that reads them: on a GPU a copy stream can
move them while layer l computes) instead of critical; layer l+1's own attention then waits for
nothing. The residual stream changes little from one layer to the next, which is why the estimate
works (docs/research/transfer.md: two thirds of a step's incoming pages are named by it at the same
width, and the quality cost was measured there).

Layers that cannot be speculated keep the default refill with their own query (critical bytes): the
first retrieving layer (nothing runs before it), multi-token steps (prefill chunks, a verification
forward of assisted decoding) and a forward through another cache. A layer whose predecessor is of
another attention type (Gemma-3: a full layer after sliding ones) gets its own type's rotary
embedding from the decoder's ``rotary_emb(x, position_ids, layer_type)``; without one it is not
speculated.

The model must be a decoder whose layers have ``input_layernorm`` and ``self_attn.q_proj`` (Llama,
Qwen2/3, Mistral, Gemma-3 style) and receive ``position_embeddings`` (every RoPE decoder of
transformers 5); anything else is refused when the cache is made.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


def decoder_layers(model) -> Any:
    """The model's ``nn.ModuleList`` of decoder layers (``model.model.layers`` and its variants)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None and hasattr(base, "language_model"):
        layers = getattr(base.language_model, "layers", None)
    return layers


def check_model(model) -> None:
    """Raise ``ValueError`` when ``prefetch='speculate'`` cannot compute a layer's query from its input."""
    layers = decoder_layers(model)
    kind = type(model).__name__
    if layers is None or not len(layers):
        raise ValueError(f"prefetch='speculate' needs the model's decoder layers; {kind} has no .model.layers: "
                         "use prefetch='none'")
    for i, layer in enumerate(layers):
        attention = getattr(layer, "self_attn", None)
        if not (hasattr(layer, "input_layernorm") and attention is not None and hasattr(attention, "q_proj")
                and hasattr(attention, "head_dim")):
            raise ValueError(f"prefetch='speculate' computes a layer's query from its input_layernorm and "
                             f"self_attn.q_proj; layer {i} of {kind} has no such modules: use prefetch='none'")


def rotate(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in transformers' convention (halves rotated): ``q (B, H, T, D)``, ``cos, sin (B, T, D)``."""
    cos, sin = cos[:, None], sin[:, None]
    half = q.shape[-1] // 2
    rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return q * cos + rotated * sin


def layer_query(layer, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """``(B, Hq, T, D)``: the query decoder ``layer`` computes from ``hidden (B, T, hidden)`` at the step's
    ``position_embeddings = (cos, sin)``: input norm, q projection, the optional q norm, RoPE."""
    attention = layer.self_attn
    d = attention.head_dim
    b, t, _ = hidden.shape
    q = attention.q_proj(layer.input_layernorm(hidden)).view(b, t, -1, d)
    norm = getattr(attention, "q_norm", None)
    if norm is not None:
        q = norm(q)
    cos, sin = position_embeddings
    return rotate(q.transpose(1, 2), cos.to(q.dtype), sin.to(q.dtype))


class Speculator:
    """Forward pre-hooks on the decoder layers of ``model`` that refill layer l+1 of ``cache`` when layer
    l starts a decode step (``runtime.refill(..., prefetched=True)``); ``runtime.before_attention`` then
    skips the layers refilled this way (:meth:`take`)."""

    def __init__(self, model, cache, runtime, late: bool = False):
        check_model(model)
        self.late = late  # speculate from layer l's post-attention residual, before its MLP
        self.layers = decoder_layers(model)
        types = getattr(model.config, "layer_types", None) or getattr(
            getattr(model.config, "text_config", None), "layer_types", None)
        self.types = list(types) if types is not None else [None] * len(self.layers)
        base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
        self.rotary = getattr(base, "rotary_emb", None)
        self.cache = weakref.ref(cache)
        self.runtime = weakref.ref(runtime)
        self.done: set[int] = set()  # layers refilled by speculation in this forward
        self.speculated = 0  # layer refills issued a layer early (a counter for stats)
        me = weakref.ref(self)
        self.handles = [layer.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: _hook(me, i, args, kwargs), with_kwargs=True)
            for i, layer in enumerate(self.layers)]
        self.inputs: dict[int, tuple] = {}  # late: layer i's (input hidden, kwargs) until its attention ran
        if late:
            self.handles += [layer.self_attn.register_forward_hook(
                lambda module, args, kwargs, output, i=i: _late_hook(me, i, output), with_kwargs=True)
                for i, layer in enumerate(self.layers)]

    def take(self, layer_idx: int) -> bool:
        """True (once) if ``layer_idx`` was refilled by speculation in this forward."""
        if layer_idx in self.done:
            self.done.discard(layer_idx)
            return True
        return False

    def before_layer(self, i: int, args, kwargs) -> None:
        if i == 0:
            self.done.clear()  # a new forward: nothing speculated yet
        cache, runtime = self.cache(), self.runtime()
        if cache is None or runtime is None:
            return
        if kwargs.get("cache", kwargs.get("past_key_values")) is not cache:
            return
        target = i + 1
        if target >= len(self.layers):
            return
        slots = runtime.layers.get(target)
        hidden = args[0] if args else kwargs.get("hidden_states")
        if slots is None or not slots.width or hidden is None or hidden.shape[1] != 1:
            return
        if self.late:  # wait for this layer's attention output (after_attention)
            self.inputs[i] = (hidden, kwargs)
            return
        self._speculate(i, target, hidden, kwargs)

    def after_attention(self, i: int, output) -> None:
        """``late``: layer ``i``'s attention returned ``output``; its post-attention residual (what its MLP
        block adds to) is the estimate of layer i+1's input."""
        pending = self.inputs.pop(i, None)
        if pending is None:
            return
        hidden, kwargs = pending
        out = output[0] if isinstance(output, (tuple, list)) else output
        layer = self.layers[i]
        with torch.no_grad():
            if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma-2/3: the attention output is normed first
                out = layer.post_attention_layernorm(out)
            self._speculate(i, i + 1, hidden + out, kwargs)

    def _speculate(self, i: int, target: int, hidden: torch.Tensor, kwargs) -> None:
        cache, runtime = self.cache(), self.runtime()
        if cache is None or runtime is None:
            return
        embeddings = self._embeddings(i, target, hidden, kwargs)
        if embeddings is None:
            return
        with torch.no_grad():
            queries = layer_query(self.layers[target], hidden, embeddings)
        runtime.refill(cache.layers[target], queries, prefetched=True)
        self.done.add(target)
        self.speculated += 1

    def _embeddings(self, i: int, target: int, hidden: torch.Tensor, kwargs) -> tuple | None:
        """The rotary ``(cos, sin)`` of layer ``target`` for this step: layer ``i``'s own when both are of
        one attention type, else the decoder's ``rotary_emb(x, position_ids, layer_type)`` (Gemma-3's
        per-type rotary), else None (not speculated)."""
        embeddings = kwargs.get("position_embeddings")
        if self.types[target] != self.types[i]:
            position_ids = kwargs.get("position_ids")
            if self.rotary is None or position_ids is None:
                return None
            try:
                embeddings = self.rotary(hidden, position_ids, self.types[target])
            except TypeError:  # a rotary module without per-type embeddings
                return None
        if not isinstance(embeddings, (tuple, list)) or len(embeddings) != 2:
            return None
        return embeddings

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.done.clear()
        self.inputs.clear()


def _hook(ref, i: int, args, kwargs) -> None:
    speculator = ref()
    if speculator is not None:
        speculator.before_layer(i, args, kwargs)


def _late_hook(ref, i: int, output) -> None:
    speculator = ref()
    if speculator is not None:
        speculator.after_attention(i, output)
