"""PeerSession: prefill under a kvpress press, decode with absolute positions, measure what is held.

kvpress compresses a ``DynamicCache`` in forward hooks during the prefill, so after it the cache's
sequence length is the number of tokens KEPT, not seen. A plain ``model(next_ids, cache)`` would then
give the next token the RoPE position ``kept`` instead of ``seen``: :meth:`PeerSession.decode`
passes ``position_ids = seen + step`` explicitly. ``cache_position`` is left to transformers: on
5.2 it indexes the stored entries (``kept + step``), which is what the causal mask needs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from transformers import DynamicCache

from heterocache.hf import cache_keyword
from heterocache.peers.kvpress import PeerSpec, build_press, parse_peer_name


def attention_modules(model) -> list[torch.nn.Module]:
    """The decoder layers' attention modules, the ones kvpress hooks (``model.model.layers[i].self_attn``)."""
    inner = model.model
    inner = getattr(inner, "language_model", inner)
    return [layer.self_attn for layer in inner.layers]


@contextmanager
def _new_transformers_hooks(press, model):
    """Make kvpress 0.5.5's hooks work on transformers that pass ``cache=`` and no ``cache_position``.

    Optional (the peers environment has transformers 5.2, where nothing is adapted): the press's
    hook gets ``past_key_values`` and a ``cache_position`` derived from the layer's length, so its
    "is this the prefill?" test (``cache_position[-1] + 1 == q_len``) holds exactly when the layer
    was empty before this forward.
    """
    if cache_keyword(model) != "cache":
        yield
        return
    original = press.forward_hook

    def hook(module, args, kwargs, output):
        if "past_key_values" not in kwargs and kwargs.get("cache") is not None:
            cache = kwargs["cache"]
            q_len = kwargs["hidden_states"].shape[1]
            stored = cache.layers[module.layer_idx].get_seq_length()
            device = kwargs["hidden_states"].device
            kwargs = {**kwargs, "past_key_values": cache,
                      "cache_position": torch.arange(stored - q_len, stored, device=device)}
        return original(module, args, kwargs, output)

    press.forward_hook = hook  # instance attribute: press(model) registers self.forward_hook
    try:
        yield
    finally:
        del press.forward_hook


class PeerSession:
    """One prompt's KV cache compressed by a kvpress press, and the decode loop over it.

    ``prefill(input_ids)`` once, then ``decode(ids)`` any number of times; ``cache`` is the
    ``DynamicCache`` (pass it nowhere else: its positions are only right through ``decode``).
    Batches without padding only (kvpress scores padding like real tokens).
    """

    def __init__(self, model, spec: PeerSpec, keep: float, press):
        self.model, self.spec, self.keep, self.press = model, spec, keep, press
        self.cache = DynamicCache(config=model.config)
        self.prompt_len = 0  # tokens prefilled (per row)
        self.seen = 0  # tokens fed so far (per row): the next token's position
        self.batch = 0
        self._keyword = cache_keyword(model)

    @property
    def name(self) -> str:
        return self.spec.name

    def _forward(self, input_ids: torch.Tensor, **kwargs: Any):
        return self.model(input_ids=input_ids, use_cache=True, **{self._keyword: self.cache}, **kwargs)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
        """Run ``input_ids (B, T)`` under the press; returns the logits ``(B, T', V)`` (``logits_to_keep`` applies)."""
        if self.prompt_len:
            raise RuntimeError("prefill() runs once per PeerSession; make a new session for a new prompt")
        mask = forward_kwargs.pop("attention_mask", None)
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("kvpress presses do not handle padding: pass rows of equal length, one at a time")
        with _new_transformers_hooks(self.press, self.model), self.press(self.model):
            out = self._forward(input_ids, **forward_kwargs)
        self.batch, self.prompt_len = input_ids.shape
        self.seen = self.prompt_len
        return out.logits

    def position_ids(self, n_new: int) -> torch.LongTensor:
        """Absolute positions ``(B, n_new)`` of the next ``n_new`` tokens: ``seen .. seen + n_new - 1``."""
        device = self.cache.layers[0].keys.device
        return torch.arange(self.seen, self.seen + n_new, device=device).expand(self.batch, n_new)

    def _uniform_lengths(self) -> bool:
        return len({layer.get_seq_length() for layer in self.cache.layers}) == 1

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
        """Feed ``input_ids (B, q)`` (generated or teacher-forced tokens) -> logits ``(B, q, V)``.

        One forward for the ``q`` tokens when every layer holds as many entries (the causal mask is
        built once, from layer 0); one forward per token otherwise (PyramidKV's per-layer budgets).
        """
        if not self.prompt_len:
            raise RuntimeError("call prefill() before decode()")
        n_new = input_ids.shape[1]
        if n_new > 1 and not self._uniform_lengths():
            return torch.cat([self.decode(input_ids[:, i:i + 1], **forward_kwargs) for i in range(n_new)], dim=1)
        out = self._forward(input_ids, position_ids=self.position_ids(n_new), **forward_kwargs)
        self.seen += n_new
        return out.logits

    @torch.no_grad()
    def greedy(self, first_logits: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None
               ) -> torch.LongTensor:
        """Greedy tokens ``(B, n <= max_new_tokens)`` starting from the logits of the last fed token."""
        stop = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
        token = first_logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        while len(tokens) < max_new_tokens and not (self.batch == 1 and int(token) in stop):
            token = self.decode(token)[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        return torch.cat(tokens, dim=1)

    def masked_entries(self) -> list[int]:
        """Per layer, the number of (row, KV head, token) entries the press masks (0 for dropping presses)."""
        out = []
        for module in attention_modules(self.model):
            indices = getattr(module, "masked_key_indices", None)
            out.append(0 if indices is None else int(indices[0].numel()))
        return out

    def stats(self) -> dict[str, Any]:
        """Measured from the tensors held, with the keys of ``HeadwiseCache.stats()`` where they apply.

        ``keep_fraction``: prompt entries attention can still see (held and not masked) over all
        prompt entries (rows x layers x KV heads x prompt length). ``stored_fraction``: prompt
        entries held in memory (1.0 for masking presses). ``device_bytes``: storage of the cache's
        key/value tensors.
        """
        decoded = self.seen - self.prompt_len
        layers = [layer for layer in self.cache.layers if layer.keys is not None and layer.keys.numel()]
        n_kv_heads = layers[0].keys.shape[1] if layers else 0
        held = sum(self.batch * n_kv_heads * (layer.keys.shape[2] - decoded) for layer in layers)
        masked = sum(self.masked_entries()) if self.spec.masks else 0
        denom = self.batch * self.prompt_len * len(self.cache.layers) * n_kv_heads
        tensors = [t for layer in layers for t in (layer.keys, layer.values)]
        return {
            "method": self.name,
            "keep": self.keep,
            "keep_fraction": (held - masked) / denom if denom else 1.0,
            "stored_fraction": held / denom if denom else 1.0,
            "masked": self.spec.masks,
            "masked_entries": masked,
            "prompt_tokens": self.batch * self.prompt_len,
            "kept_tokens": held - masked,
            "seen_tokens": self.seen,
            "device_bytes": sum(t.untyped_storage().nbytes() for t in tensors),
            "device_used_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "host_bytes": 0,
            "disk_bytes": 0,
        }

    def close(self) -> None:
        """Free the cache and clear the masks kvpress leaves on the attention modules."""
        self.cache = DynamicCache(config=self.model.config)
        for module in attention_modules(self.model):
            if getattr(module, "masked_key_indices", None) is not None:
                module.masked_key_indices = None


def make_peer_session(model, method: str, keep: float, **press_options: Any) -> PeerSession:
    """A :class:`PeerSession` for peer ``method`` (``"kvpress:snapkv"``, ``"kvpress:adakv+tova"``) at ``keep``.

    Unknown names/options or ``keep`` outside (0, 1] raise ValueError; a missing kvpress raises
    ImportError naming the ``peers`` extra.
    """
    spec = parse_peer_name(method)
    press = build_press(method, keep, **press_options)
    return PeerSession(model, spec, keep, press)
