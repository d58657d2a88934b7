"""``heterocache bench`` measurements: one model on one device, prefill + timed decode per method.

Protocol and result lines: see heterocache/bench/__init__.py.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from heterocache.bench.models import kv_bytes, load_model_for_bench, weight_read_bytes
from heterocache.bench.report import megabytes, open_results, result_key, write_report
from heterocache.eval.grid import Feeder, method_grid, pending
from heterocache.eval.search import largest_fitting

CPU_MEMORY_NOTE = "CPU: cache device_bytes only (no allocator peak; weights and activations not counted)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(feeder: Feeder, input_ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One prefill forward of ``input_ids (B, T)`` into ``feeder``'s cache: ``(seconds, next token (B, 1))``."""
    _sync(input_ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        token = feeder(input_ids, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
    _sync(input_ids.device)
    return time.perf_counter() - start, token


def decode_step(feeder: Feeder, token: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One greedy single-token forward: ``(milliseconds, next token (B, 1))``."""
    start = time.perf_counter()
    with torch.no_grad():
        token = feeder(token)[:, -1].argmax(-1, keepdim=True)
    _sync(token.device)
    return (time.perf_counter() - start) * 1000, token


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


class Bench:
    """One model on one device; ``measure`` produces one result line."""

    def __init__(self, model, model_tag: str, seed: int = 0):
        from heterocache.models import model_geometry

        self.model, self.model_tag, self.seed = model, model_tag, seed
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.geometry = model_geometry(model)
        self.weight_bytes = weight_read_bytes(model)

    def prompt(self, context: int, batch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + context * 131 + batch)
        vocab = self.model.config.get_text_config().vocab_size
        return torch.randint(3, vocab, (batch, context), generator=gen).to(self.device)

    def key(self, **fields) -> dict:
        return {"model": self.model_tag, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "threads": torch.get_num_threads(), **fields}

    def measure(self, runs: list[tuple[str, float, dict]], context: int, batch: int, steps: int, warmup: int,
                schedule: str = "sequential") -> list[dict]:
        """Prefill a cache per ``(method, keep, options)`` run, then time their decode steps round-robin.

        With one run this is the plain protocol; with several (``schedule="interleaved"``) every
        method sees the same machine load, which keeps speedups meaningful on a shared machine (CUDA
        peak memory is then the group's). A run whose method rejects the setting (``ValueError``) is
        skipped with a message. Returns one result line per measured run.
        """
        ids = self.prompt(context, batch)
        measured, caches, tokens, prefills = [], [], [], []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            for method, keep, options in runs:
                try:
                    caches.append(Feeder.open(self.model, method, keep, options))
                    seconds, token = prefill(caches[-1], ids)
                except ValueError as err:
                    print(f"bench: skipping {method} keep={keep:g} context={context}: {err}")
                    if len(caches) > len(measured):
                        caches.pop().close()
                    continue
                measured.append((method, keep, options))
                prefills.append(seconds)
                tokens.append(token)
            times = [[] for _ in caches]
            for _ in range(warmup + steps):
                for i, cache in enumerate(caches):
                    ms, tokens[i] = decode_step(cache, tokens[i])
                    times[i].append(ms)
            return [self._line(m, k, o, context, batch, steps, warmup, prefills[i], times[i][warmup:], caches[i],
                               schedule) for i, (m, k, o) in enumerate(measured)]
        finally:
            for cache in caches:
                cache.close()

    def _line(self, method, keep, options, context, batch, steps, warmup, prefill_s, times, cache,
              schedule) -> dict:
        stats = cache.stats()
        decode_ms = statistics.median(times)
        full_kv = kv_bytes(self.geometry, context, batch, self.dtype)
        if self.device.type == "cuda":
            peak, note = torch.cuda.max_memory_allocated(self.device), "cuda max_memory_allocated"
        else:
            peak, note = stats["device_bytes"], CPU_MEMORY_NOTE
        return {
            "kind": "decode", **self.key(method=method, keep=keep, options=_jsonable(options), context=context,
                                         batch=batch, steps=steps, warmup=warmup, schedule=schedule),
            "prefill_s": prefill_s, "decode_ms": decode_ms, "decode_ms_steps": times,
            "tokens_per_s": batch * 1000.0 / decode_ms, "peak_memory_bytes": int(peak), "peak_memory_note": note,
            "cache": _jsonable(stats), "weight_bytes": self.weight_bytes, "kv_full_bytes": full_kv,
            "read_bytes_per_token": self.weight_bytes + stats["keep_fraction"] * full_kv,
            "torch": torch.__version__, "load_average": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def max_batch(self, method: str, keep: float, options: dict, context: int, limit: int) -> int:
        """Largest batch whose prefill + two decode steps fit in device memory (CUDA only)."""
        def fits(batch: int) -> bool:
            try:
                return bool(self.measure([(method, keep, options)], context, batch, steps=2, warmup=0))
            except torch.cuda.OutOfMemoryError:
                return False
            finally:
                torch.cuda.empty_cache()

        return largest_fitting(fits, limit)


def run_bench(args, contexts: list[int], methods: list[str], keeps: list[float], batches: list[int],
              options: dict[str, dict]) -> int:
    """Measure the grid (FullKV + every method x keep) at every context x batch; arguments already checked."""
    from heterocache.models import is_embedded

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bench = Bench(*load_model_for_bench(args), seed=args.seed)
    limit = bench.geometry["max_positions"]
    if limit and max(contexts) + args.warmup + args.steps + 1 > limit:
        raise ValueError(f"--context {max(contexts)} + {args.warmup + args.steps + 1} decode tokens exceeds the "
                         f"model's {limit} positions")
    if "heterocache" in methods and "profile" not in options.get("heterocache", {}):
        if args.model_config:
            print("bench: skipping heterocache: a random-weight --model-config model has no head profile; pass "
                  "--option heterocache.profile=PATH (a profile of this very model) to include it")
            methods = [m for m in methods if m != "heterocache"]
        elif is_embedded(bench.model):
            print("bench: heterocache uses the embedded model's cached head profile (the first calibration "
                  "takes minutes)")
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench: {bench.model_tag} on {bench.device} ({bench.dtype}); weights read per decode token "
          f"{megabytes(bench.weight_bytes)} MB")
    schedule = "interleaved" if args.interleave else "sequential"
    grid = method_grid(methods, keeps)

    def decode_key(method: str, keep: float, context: int, batch: int) -> dict:
        return {"kind": "decode", **bench.key(method=method, keep=keep, options=_jsonable(options.get(method, {})),
                                              context=context, batch=batch, steps=args.steps, warmup=args.warmup,
                                              schedule=schedule)}

    def max_batch_key(method: str, keep: float, context: int) -> dict:
        return {"kind": "max_batch", **bench.key(method=method, keep=keep, options=_jsonable(options.get(method, {})),
                                                 context=context, batch=None, steps=None, warmup=None)}

    with open_results(out_dir) as results:
        settings = [(context, batch) for context in contexts for batch in batches]
        for (context, batch), todo in pending(settings, grid,
                                              lambda s, m, k: result_key(decode_key(m, k, *s)) in results):
            runs = [(method, keep, options.get(method, {})) for method, keep in todo]
            if args.interleave:
                if runs[0][0] != "full":  # the reference must share the schedule: measure it again
                    runs.insert(0, ("full", 1.0, options.get("full", {})))
                groups = [runs]
            else:
                groups = [[run] for run in runs]
            for group in groups:
                for line in bench.measure(group, context, batch, args.steps, args.warmup, schedule):
                    results.append(line)
                    print(f"  {line['method']:13s} keep={line['keep']:<5g} context={context:<6d} batch={batch:<3d} "
                          f"prefill {line['prefill_s']:.2f} s  decode {line['decode_ms']:.1f} ms/token  kept "
                          f"{line['cache']['keep_fraction']:.3f}", flush=True)
        if args.max_batch and bench.device.type != "cuda":
            print("bench: --max-batch is not applicable on CPU (there is no fixed device memory to fill)")
        elif args.max_batch:
            for context, todo in pending(contexts, grid, lambda c, m, k: result_key(max_batch_key(m, k, c)) in results):
                for method, keep in todo:
                    found = bench.max_batch(method, keep, options.get(method, {}), context, args.max_batch_limit)
                    results.append({**max_batch_key(method, keep, context), "max_batch": found})
                    print(f"  {method:13s} keep={keep:<5g} context={context:<6d} max batch {found}", flush=True)
        write_report(results.lines, bench.model_tag, out_dir)
    return 0
