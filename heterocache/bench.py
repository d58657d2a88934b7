"""``heterocache bench``: prefill time, decode ms/token, memory and speedup vs FullKV per method.

Protocol (PEERS.md): random prompt token ids of each context length (timing only: methods
still compress normally), one prefill forward, then single-token forwards feeding back the argmax;
decode time = median of ``--steps`` steps after ``--warmup`` warm-up steps, ``torch.cuda.synchronize``
around every timed region on CUDA. Every method is compared with ``full`` measured by the same
command; ``--interleave`` times the methods' decode steps round-robin instead of one after the
other, so on a shared, loaded machine all of them see the same conditions. Next to each speedup
stands the memory-bandwidth bound ``(W + KV) / (W + r * KV)`` (W = weight bytes read per token,
KV = full KV bytes, r = measured kept fraction).

Results go to ``DIR/results.jsonl`` one line per (method, keep, context, batch) as they finish
(rerunning skips finished lines), then ``results.json`` (rows with the derived columns),
``table.md`` and ``decode_ms.png``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from heterocache.bench_models import ARCHITECTURES, kv_bytes, load_model_for_bench, weight_read_bytes
from heterocache.bench_report import ResultFile, megabytes, result_key, write_report

CPU_MEMORY_NOTE = "CPU: cache device_bytes only (no allocator peak; weights and activations not counted)"

def parse_contexts(text: str) -> list[int]:
    """``"2k,4k,7.5k,900"`` -> ``[2000, 4000, 7500, 900]`` (k = 1000 tokens)."""
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        try:
            value = float(part[:-1]) * 1000 if part.endswith("k") else float(part)
        except ValueError:
            raise ValueError(f"--context {text!r}: {part!r} is not a token count like 4000 or 7.5k") from None
        if value < 1 or value != int(value):
            raise ValueError(f"--context {text!r}: {part!r} must be a whole number of tokens >= 1")
        out.append(int(value))
    if not out:
        raise ValueError("--context needs at least one length")
    return out


def parse_method_options(pairs: list[str] | None, methods: list[str]) -> dict[str, dict]:
    """``["heterocache:profile=p.json"]`` -> ``{"heterocache": {"profile": "p.json"}}``."""
    from heterocache.cli import parse_options

    out: dict[str, dict] = {}
    for pair in pairs or []:
        method, sep, option = pair.partition(":")
        if not sep or "=" not in option:
            raise ValueError(f"--method-option {pair!r} must look like METHOD:NAME=VALUE")
        if method not in methods:
            raise ValueError(f"--method-option {pair!r}: method {method!r} is not in --methods ({', '.join(methods)})")
        out.setdefault(method, {}).update(parse_options([option]))
    return out


def largest_fitting(fits, limit: int) -> int:
    """Largest ``b`` in ``[1, limit]`` with ``fits(b)`` (monotone): doubling, then bisection. 0 if none."""
    good, batch = 0, 1
    while batch <= limit and fits(batch):
        good, batch = batch, batch * 2
    if good == limit:
        return limit
    bad = batch if batch <= limit else None
    if bad is None:  # every power of two up to the limit fitted: try the limit itself
        if fits(limit):
            return limit
        bad = limit
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model, cache, input_ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One prefill forward of ``input_ids (B, T)`` into ``cache``: ``(seconds, next token (B, 1))``."""
    _sync(input_ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(input_ids.device)
    return time.perf_counter() - start, token


def decode_step(model, cache, token: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One greedy single-token forward: ``(milliseconds, next token (B, 1))``."""
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
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
        from heterocache import make_cache

        ids = self.prompt(context, batch)
        measured, caches, tokens, prefills = [], [], [], []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            for method, keep, options in runs:
                try:
                    caches.append(make_cache(self.model, method, keep, **options))
                    seconds, token = prefill(self.model, caches[-1], ids)
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
                    ms, tokens[i] = decode_step(self.model, cache, tokens[i])
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


def _plan(methods: list[str], keeps: list[float]) -> list[tuple[str, float]]:
    runs = [("full", 1.0)]
    runs += [(m, k) for m in methods if m != "full" for k in keeps]
    return runs


def _selection(args) -> tuple[list[int], list[str], list[float], list[int], dict]:
    """Validated ``(contexts, methods, keeps, batches, method options)``, before the model loads."""
    from heterocache.budget import validate_keep
    from heterocache.methods.base import available_methods

    contexts = parse_contexts(args.context)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in available_methods()]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown}; available: {', '.join(available_methods())}")
    keeps = [validate_keep(k) for k in args.keep.split(",")]
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise ValueError(f"--batch {args.batch!r} must be a comma list of integers") from None
    if min(batches) < 1 or args.steps < 1 or args.warmup < 0:
        raise ValueError("--batch values and --steps must be >= 1, --warmup >= 0")
    if "full" not in methods:
        print("bench: adding `full` (speedups are measured against it in the same run)")
    return contexts, methods, keeps, batches, parse_method_options(args.method_option, methods)


def run_bench(args) -> int:
    from heterocache.models import is_embedded

    contexts, methods, keeps, batches, options = _selection(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    bench = Bench(*load_model_for_bench(args), seed=args.seed)
    limit = bench.geometry["max_positions"]
    if limit and max(contexts) + args.warmup + args.steps + 1 > limit:
        raise ValueError(f"--context {max(contexts)} + {args.warmup + args.steps + 1} decode tokens exceeds the "
                         f"model's {limit} positions")
    if "heterocache" in methods and "profile" not in options.get("heterocache", {}):
        if args.model_config:
            print("bench: skipping heterocache: a random-weight --model-config model has no head profile; pass "
                  "--method-option heterocache:profile=PATH (a profile of this very model) to include it")
            methods.remove("heterocache")
        elif is_embedded(bench.model):
            print("bench: heterocache uses the embedded model's cached head profile (the first calibration "
                  "takes minutes)")
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = ResultFile(out_dir)
    print(f"bench: {bench.model_tag} on {bench.device} ({bench.dtype}); weights read per decode token "
          f"{megabytes(bench.weight_bytes)} MB")
    schedule = "interleaved" if args.interleave else "sequential"
    for context in contexts:
        for batch in batches:
            runs = []
            for method, keep in _plan(methods, keeps):
                opts = options.get(method, {})
                key = {"kind": "decode", **bench.key(method=method, keep=keep, options=_jsonable(opts), context=context,
                                                      batch=batch, steps=args.steps, warmup=args.warmup,
                                                      schedule=schedule)}
                if result_key(key) not in results.done:
                    runs.append((method, keep, opts))
            if args.interleave and runs:
                if runs[0][0] != "full":  # the reference must share the schedule: measure it again
                    runs.insert(0, ("full", 1.0, options.get("full", {})))
                groups = [runs]
            else:
                groups = [[run] for run in runs]
            for group in groups:
                for line in bench.measure(group, context, batch, args.steps, args.warmup, schedule):
                    results.record(line)
                    print(f"  {line['method']:13s} keep={line['keep']:<5g} context={context:<6d} batch={batch:<3d} "
                          f"prefill {line['prefill_s']:.2f} s  decode {line['decode_ms']:.1f} ms/token  kept "
                          f"{line['cache']['keep_fraction']:.3f}", flush=True)
    if args.max_batch and bench.device.type != "cuda":
        print("bench: --max-batch is not applicable on CPU (there is no fixed device memory to fill)")
    elif args.max_batch:
        for context in contexts:
            for method, keep in _plan(methods, keeps):
                opts = options.get(method, {})
                key = {"kind": "max_batch", **bench.key(method=method, keep=keep, options=_jsonable(opts),
                                                         context=context, batch=None, steps=None, warmup=None)}
                if result_key(key) not in results.done:
                    found = bench.max_batch(method, keep, opts, context, args.max_batch_limit)
                    results.record({**key, "max_batch": found})
                    print(f"  {method:13s} keep={keep:<5g} context={context:<6d} max batch {found}", flush=True)
    write_report(results.lines, bench.model_tag, out_dir)
    return 0


def _command(args) -> int:
    try:
        return run_bench(args)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


def add_bench_command(subparsers) -> None:
    """Add ``bench`` to the ``heterocache`` command line."""
    p = subparsers.add_parser("bench", help="decode latency / memory / speedup vs full per method",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", default="2k,4k,7.5k", help="prompt lengths, e.g. 2k,4k,7.5k (k = 1000)")
    p.add_argument("--methods", default="full,snapkv", help="comma list; `full` is always measured")
    p.add_argument("--keep", default="0.25", help="comma list of kept fractions for the compressed methods")
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps (median reported)")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    p.add_argument("--interleave", action="store_true",
                   help="prefill every method, then time their decode steps round-robin (fair on a loaded machine)")
    p.add_argument("--max-batch", action="store_true",
                   help="find the largest batch that fits per method (CUDA; doubling + bisection)")
    p.add_argument("--max-batch-limit", type=int, default=256)
    p.add_argument("--model", default="embedded", help="local HF directory or hub id (default: embedded SmolLM2)")
    p.add_argument("--model-config", choices=sorted(ARCHITECTURES), default=None, metavar="{llama-3.1-8b,qwen2.5-7b}",
                   help="random-weight model of that architecture (timing only; bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the --model-config model")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: per model)")
    p.add_argument("--method-option", action="append", metavar="METHOD:NAME=VALUE",
                   help="method option, e.g. heterocache:profile=profile.json (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="prompt ids and random weights")
    p.add_argument("--out", default=None, help="directory for results.jsonl/json, table.md, decode_ms.png")
    p.set_defaults(func=_command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heterocache.bench")
    add_bench_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
