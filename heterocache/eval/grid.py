"""The comparison protocol shared by ``heterocache eval`` and ``heterocache bench``.

FullKV runs once, at keep 1.0 whatever ``keeps`` says; every other method runs at every ``keep``;
all of them on the same inputs (samples, fidelity windows, bench prompts), so differences come from
the cache alone (docs/DESIGN.md s.7). Jobs already in the result log are skipped (resume).

A job's cache sits behind a :class:`Feeder`: ``feeder(input_ids)`` runs the model over the next
ids through that cache and returns the logits. Ours is a ``HeadwiseCache`` handed to the model;
a peer method (``kvpress:PRESS``, heterocache.peers) is a ``PeerSession`` whose first call is the
prefill under the press and whose later calls decode with absolute positions; the FullKV reference
of the fidelity protocol is a plain ``DynamicCache``.

Shared prefill (:func:`share_prefill`, on by default in eval, fidelity and the interleaved bench): the
jobs of one prompt whose caches are ours (and the ``DynamicCache`` reference) are filled by one
forward through a ``FanoutCache`` (heterocache/fanout.py); the prefill is exact, so every job gets
the logits and the cache it would have got from its own prefill. :meth:`SharedPrefill.timing` then
reports a job's prefill as the shared forward without the other jobs' ``compress`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

Input = TypeVar("Input")


def method_grid(methods: Sequence[str], keeps: Sequence[float]) -> list[tuple[str, float]]:
    """``(method, keep)`` pairs: ``("full", 1.0)`` first when selected, then every method x keep."""
    grid = [("full", 1.0)] if "full" in methods else []
    return grid + [(method, keep) for method in methods if method != "full" for keep in keeps]


def pending(inputs: Iterable[Input], grid: Sequence[tuple[str, float]],
            is_done: Callable[[Input, str, float], bool]) -> list[tuple[Input, list[tuple[str, float]]]]:
    """Per input (in order), the grid pairs not done yet; inputs with nothing left are omitted."""
    out = []
    for item in inputs:
        runs = [(method, keep) for method, keep in grid if not is_done(item, method, keep)]
        if runs:
            out.append((item, runs))
    return out


def is_peer(method: str) -> bool:
    return method.startswith("kvpress:")


def base_method(label: str) -> str:
    """The registered method of a run label: ``"heterocache@pages"`` -> ``"heterocache"``. A label
    ``METHOD@VARIANT`` runs METHOD under its own name, with its own ``--option METHOD@VARIANT.NAME=VALUE``
    values, beside the plain METHOD in the same run (ablations on the same prompts and prefill)."""
    return label.partition("@")[0]


class Feeder:
    """One job's cache behind one call: ``feeder(input_ids (B, q), **forward_kwargs) -> logits``."""

    def __init__(self, model, cache=None, session=None):
        self.model, self.cache, self.session = model, cache, session

    @classmethod
    def open(cls, model, method: str, keep: float, options: dict[str, Any] | None = None) -> Feeder:
        """A fresh cache for ``method`` at ``keep`` (``hc.make_cache``, or a peer's session)."""
        if is_peer(method):
            from heterocache.peers import make_peer_session

            return cls(model, session=make_peer_session(model, method, keep, **(options or {})))
        from heterocache import make_cache

        return cls(model, cache=make_cache(model, base_method(method), keep, **(options or {})))

    @classmethod
    def reference(cls, model) -> Feeder:
        """Uncompressed ``DynamicCache`` (the fidelity reference)."""
        from transformers import DynamicCache

        return cls(model, cache=DynamicCache(config=model.config))

    def __call__(self, input_ids: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
        if self.session is not None:
            if not self.session.prompt_len:
                return self.session.prefill(input_ids, **forward_kwargs)
            return self.session.decode(input_ids, **forward_kwargs)
        from heterocache.hf import cache_kwargs

        out = self.model(input_ids=input_ids, use_cache=True, **cache_kwargs(self.cache, self.model),
                         **forward_kwargs)
        return out.logits

    def stats(self) -> dict[str, Any]:
        source = self.session if self.session is not None else self.cache
        return source.stats() if hasattr(source, "stats") else {}

    def close(self) -> None:
        source = self.session if self.session is not None else self.cache
        if hasattr(source, "close"):
            source.close()



@dataclass
class SharedPrefill:
    """One forward that prefilled several feeders' caches.

    ``logits (B, q, V)``: the forward's logits (every feeder's first logits, ``q`` = ``logits_to_keep``);
    ``seconds``: the measured forward (every child's ``compress`` included); ``compress_s``: each
    feeder's own ``compress`` seconds, in the feeders' order (0 for the ``DynamicCache`` reference).
    """

    logits: torch.Tensor
    seconds: float
    compress_s: list[float]

    def timing(self, index: int, digits: int | None = 4) -> dict[str, Any]:
        """Feeder ``index``'s prefill fields: ``prefill_s`` = the shared forward minus every feeder's
        ``compress`` seconds plus its own (what its own prefill would have taken), ``compress_s`` (its
        own), ``shared_prefill_s`` (the measured forward) and ``shared_prefill_jobs`` (how many caches);
        seconds rounded to ``digits`` (None: not rounded)."""
        dense = max(self.seconds - sum(self.compress_s), 0.0)
        own = self.compress_s[index]
        seconds = {"prefill_s": dense + own, "compress_s": own, "shared_prefill_s": self.seconds}
        if digits is not None:
            seconds = {name: round(value, digits) for name, value in seconds.items()}
        return {**seconds, "shared_prefill_jobs": len(self.compress_s)}


def share_prefill(model, feeders: Sequence[Feeder], input_ids: torch.Tensor, **forward_kwargs: Any) -> SharedPrefill:
    """Prefill ``input_ids (B, T)`` into every feeder's fresh cache with one forward (``forward_kwargs``:
    e.g. ``attention_mask``, ``position_ids``, ``logits_to_keep``); ValueError for a peer's feeder,
    a used cache or caches of different models (``FanoutCache``)."""
    from heterocache.fanout import FanoutCache

    if any(f.session is not None for f in feeders):
        raise ValueError("share_prefill: a peer's session (kvpress:*) prefills under its own press; run it alone")
    fanout = FanoutCache([f.cache for f in feeders])
    _sync(input_ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        logits = Feeder(model, cache=fanout)(input_ids, **forward_kwargs)
    _sync(input_ids.device)
    return SharedPrefill(logits, time.perf_counter() - start, [float(s) for s in fanout.compress_s])


@dataclass
class Job:
    """One run's feeder; ``logits (B, q, V)`` and ``timing`` (:meth:`SharedPrefill.timing`) are set when
    a shared prefill already filled its cache, else None (the job prefills itself)."""

    method: str
    keep: float
    feeder: Feeder
    logits: torch.Tensor | None = None
    timing: dict[str, Any] | None = None


def open_jobs(model, runs: Sequence[tuple[str, float]], options: dict[str, dict] | None, input_ids: torch.Tensor,
              shared: bool = True, reference: bool = False, **forward_kwargs: Any) -> Iterator[Job]:
    """A :class:`Job` per ``(method, keep)`` of ``runs``, after the FullKV ``DynamicCache`` reference
    (``Job("reference", 1.0, ...)``) when ``reference``.

    With ``shared`` and at least two caches to share (ours and the reference; not the peers'), those
    are prefilled by one forward over ``input_ids (B, T)`` (``forward_kwargs`` as for the model, e.g.
    ``logits_to_keep``) and come first, in order; the peers' jobs follow and prefill themselves.
    Otherwise every job is opened when reached. A prefilled job the caller never reached (it stopped
    iterating, e.g. on an error) is closed.
    """
    options = options or {}
    own = [(m, k) for m, k in runs if not is_peer(m)]
    if not shared or len(own) + reference < 2:
        if reference:
            yield Job("reference", 1.0, Feeder.reference(model))
        for method, keep in runs:
            yield Job(method, keep, Feeder.open(model, method, keep, options.get(method)))
        return
    jobs = [Job("reference", 1.0, Feeder.reference(model))] if reference else []
    jobs += [Job(m, k, Feeder.open(model, m, k, options.get(m))) for m, k in own]
    try:
        prefill = share_prefill(model, [job.feeder for job in jobs], input_ids, **forward_kwargs)
        for index, job in enumerate(jobs):
            jobs[index] = None  # the caller owns it now: its cache goes when the caller drops it
            job.logits, job.timing = prefill.logits, prefill.timing(index)
            yield job
    finally:
        for job in jobs:
            if job is not None:
                job.feeder.close()
    for method, keep in runs:
        if is_peer(method):
            yield Job(method, keep, Feeder.open(model, method, keep, options.get(method)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
