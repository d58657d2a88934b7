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
from heterocache.eval.grid import Feeder, base_method, method_grid, pending, share_prefill
from heterocache.eval.search import largest_fitting

CPU_MEMORY_NOTE = "CPU: cache device_bytes only (no allocator peak; weights and activations not counted)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(feeder: Feeder, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """One prefill forward of ``input_ids (B, T)`` (``mask (B, T)``: 0 on left padding) into ``feeder``'s
    cache: ``(seconds, next token (B, 1))``."""
    kwargs = _mask_kwargs(mask)
    _sync(input_ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        token = feeder(input_ids, logits_to_keep=1, **kwargs)[:, -1].argmax(-1, keepdim=True)
    _sync(input_ids.device)
    return time.perf_counter() - start, token


def _mask_kwargs(mask: torch.Tensor | None) -> dict:
    """A left-padded prompt's ``attention_mask`` and ``position_ids`` (none without padding)."""
    return {} if mask is None else {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def decode_step(feeder: Feeder, token: torch.Tensor, **forward_kwargs) -> tuple[float, torch.Tensor]:
    """One greedy single-token forward: ``(milliseconds, next token (B, 1))``."""
    start = time.perf_counter()
    with torch.no_grad():
        token = feeder(token, **forward_kwargs)[:, -1].argmax(-1, keepdim=True)
    _sync(token.device)
    return (time.perf_counter() - start) * 1000, token


class _Decoder:
    """One run's decode state: its cache, last token and, for left-padded batches, mask and positions."""

    def __init__(self, feeder: Feeder, token: torch.Tensor, mask: torch.Tensor | None):
        self.feeder, self.token, self.mask = feeder, token, mask
        self.position = None if mask is None else mask.sum(-1, keepdim=True)  # (B, 1) next RoPE position
        stats = feeder.stats()
        self.at_prefill = _time_counters(stats)  # what the prefill already spent
        self.bytes_at_prefill = _byte_counters(stats)
        self.bytes_at_timed = self.bytes_at_prefill  # set again after the warm-up steps (mark_timed)

    def mark_timed(self) -> None:
        """The slow-tier byte counters where the timed decode steps begin (after the warm-up)."""
        self.bytes_at_timed = _byte_counters(self.feeder.stats())

    def step(self) -> float:
        if self.mask is None:
            ms, self.token = decode_step(self.feeder, self.token)
            return ms
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
        ms, self.token = decode_step(self.feeder, self.token, attention_mask=self.mask, position_ids=self.position)
        self.position = self.position + 1
        return ms


def _time_counters(stats: dict) -> dict[str, float]:
    """The time counters a method reports: stats keys ending in ``_s``."""
    return {name: value for name, value in stats.items()
            if name.endswith("_s") and isinstance(value, (int, float)) and not isinstance(value, bool)}


BYTE_COUNTERS = ("retrieval_bytes", "retrieval_critical_bytes", "retrieval_prefetched_bytes")


def _byte_counters(stats: dict) -> dict[str, int]:
    """The slow-tier byte counters of a method's stats (0 where it reports none: no retrieval)."""
    return {name: int(stats.get(name, 0) or 0) for name in BYTE_COUNTERS}


def transfer_fields(stats: dict, at_prefill: dict, at_timed: dict, steps: int, batch: int, full_kv: int) -> dict:
    """Slow-tier bytes of the timed decode steps only (the warm-up and what the prefill moved are left
    out), per decode token (one row's token: bytes / (steps x batch)) and as a share of the full KV of
    the context (per step / ``full_kv``, the full KV of every row), split into critical-path and
    prefetched bytes; bytes a method counted without the split count as critical. Also the device
    bytes a step reads: ``device_kv_read_bytes`` (held prompt tokens: ``keep_fraction``, or
    ``stored_fraction`` for a peer that masks, of the full KV) and ``device_metadata_bytes`` (the
    method's own device bytes: indexes and summaries, not its storage, padding or an emulated device tier)."""
    now = _byte_counters(stats)
    total, critical, prefetched = (now[n] - at_timed[n] for n in BYTE_COUNTERS)
    critical += max(0, total - critical - prefetched)
    tokens = max(1, steps * batch)
    storage = stats.get("device_used_bytes", 0) + stats.get("device_overhead_bytes", 0)
    metadata = stats["device_bytes"] - storage - stats.get("device_tier_bytes", 0) if "device_overhead_bytes" in stats else 0
    out = {
        "decode_slow_tier_bytes": {"critical": critical, "prefetched": prefetched, "steps": steps},
        "critical_bytes_per_token": critical / tokens, "prefetched_bytes_per_token": prefetched / tokens,
        "critical_share_of_kv": critical / max(1, steps) / full_kv if full_kv else 0.0,
        "prefetched_share_of_kv": prefetched / max(1, steps) / full_kv if full_kv else 0.0,
        "device_kv_read_bytes": stats.get("stored_fraction", stats["keep_fraction"]) * full_kv,
        "device_metadata_bytes": max(0, int(metadata)),
    }
    moved_in_prefill = at_prefill["retrieval_bytes"]
    if moved_in_prefill:
        out["prefill_slow_tier_bytes"] = moved_in_prefill
    return out


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

    def __init__(self, model, model_tag: str, seed: int = 0, prompt: str = "random"):
        from heterocache.models import model_geometry

        self.model, self.model_tag, self.seed = model, model_tag, seed
        self.essays: list[int] | None = None  # ``prompt="essays"``: the essays' token ids (tokenised once)
        self.prompt_kind = prompt
        if prompt == "essays":
            tokenizer = getattr(model, "bench_tokenizer", None)
            if tokenizer is None:
                raise ValueError("--prompt essays needs a model with a tokenizer (a --model-config model has "
                                 "random weights and none): use --prompt random")
            from heterocache.eval.fidelity import PEERS_SEPARATOR
            from heterocache.eval.tasks.essays import essay_text

            self.essays = tokenizer(essay_text(None, PEERS_SEPARATOR), add_special_tokens=False,
                                    verbose=False)["input_ids"]
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.geometry = model_geometry(model)
        self.weight_bytes = weight_read_bytes(model)
        self.resident_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def prompt(self, context: int, batch: int, spread: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt ids ``(B, context)``: essay text (``prompt="essays"``: the PEERS essays, row ``i`` from
        token ``i * context`` on, wrapping around) or random ids; with ``spread`` > 0 row ``i`` has
        ``context * (1 - spread * i / (B - 1))`` real tokens, left-padded, and the mask ``(B, context)``
        (0 on padding) comes along (else None)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + context * 131 + batch)
        vocab = self.model.config.get_text_config().vocab_size
        if self.essays is not None:
            stream = torch.tensor(self.essays)
            starts = [(i * context) % len(self.essays) for i in range(batch)]
            ids = torch.stack([stream[(torch.arange(context) + start) % len(self.essays)] for start in starts])
        else:
            ids = torch.randint(3, vocab, (batch, context), generator=gen)
        if spread <= 0 or batch == 1:
            return ids.to(self.device), None
        lengths = [max(1, round(context * (1 - spread * i / (batch - 1)))) for i in range(batch)]
        mask = (torch.arange(context)[None, :] >= context - torch.tensor(lengths)[:, None]).long()
        return ids.masked_fill(mask == 0, 0).to(self.device), mask.to(self.device)

    def key(self, **fields) -> dict:
        return {"model": self.model_tag, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "threads": torch.get_num_threads(), "prompt": self.prompt_kind, **fields}

    def measure(self, runs: list[tuple], context: int, batch: int, steps: int, warmup: int,
                schedule: str = "sequential", spread: float = 0.0, shared: bool = True) -> list[dict]:
        """Prefill a cache per ``(method, keep, options[, run_context])`` run, then time their decode steps
        round-robin.

        With one run this is the plain protocol; with several (``schedule="interleaved"``) every
        method sees the same machine load, which keeps speedups meaningful on a shared machine (CUDA
        peak memory is then the group's). A ``run_context`` other than ``context`` is the natural
        limit of a keep: ``full`` at ``keep * context`` tokens (a prompt of that length; its line has
        ``natural_limit = context``). A run whose method rejects the setting (``ValueError``) is
        skipped with a message. ``spread``: left-padded batch rows of different lengths
        (:meth:`prompt`). ``shared``: our methods' runs on the ``context`` prompt (two or more) are
        prefilled by one forward (:meth:`_prefill_all`). Returns one result line per measured run.
        """
        measured, decoders, prefills = [], [], []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            for run, feeder, mask, timing, token in self._prefill_all(runs, context, batch, spread, shared):
                method, keep, options = run[:3]
                measured.append((method, keep, options, run[3] if len(run) > 3 else context, mask))
                prefills.append(timing)
                decoders.append(_Decoder(feeder, token, mask))
            times = [[] for _ in decoders]
            for step in range(warmup + steps):
                if step == warmup:
                    for decoder in decoders:
                        decoder.mark_timed()
                for i, decoder in enumerate(decoders):
                    times[i].append(decoder.step())
            return [self._line(m, k, o, context, batch, steps, warmup, prefills[i], times[i], decoders[i].feeder,
                               schedule, run_context, mask, spread, decoders[i])
                    for i, (m, k, o, run_context, mask) in enumerate(measured)]
        finally:
            for decoder in decoders:
                decoder.feeder.close()

    def _prefill_all(self, runs: list[tuple], context: int, batch: int, spread: float, shared: bool) -> list[tuple]:
        """``(run, feeder, mask, timing, next token (B, 1))`` per run that opened and prefilled, in ``runs``'
        order; ``timing``: ``{"prefill_s": seconds}``, or a shared forward's fields
        (``SharedPrefill.timing``: ``prefill_s`` = the forward less the other runs' ``compress_s``). A
        shared forward that raises ``ValueError`` falls back to one prefill per run."""
        opened = []
        for run in runs:
            method, keep, options = run[:3]
            try:
                opened.append((run, Feeder.open(self.model, method, keep, options)))
            except ValueError as err:
                print(f"bench: skipping {method} keep={keep:g} context={context}: {err}")
        together = [i for i, (run, feeder) in enumerate(opened)
                    if shared and feeder.session is None and (run[3] if len(run) > 3 else context) == context]
        done: dict[int, tuple] = {}
        if len(together) > 1:
            ids, mask = self.prompt(context, batch, spread)
            try:
                result = share_prefill(self.model, [opened[i][1] for i in together], ids, logits_to_keep=1,
                                       **_mask_kwargs(mask))
            except ValueError as err:
                print(f"bench: the shared prefill failed ({err}); prefilling every method alone")
                for i in together:
                    opened[i][1].close()
                    run = opened[i][0]
                    opened[i] = (run, Feeder.open(self.model, *run[:3]))
            else:
                token = result.logits[:, -1].argmax(-1, keepdim=True)
                done = {i: (*opened[i], mask, result.timing(n, digits=None), token) for n, i in enumerate(together)}
        out = []
        for i, (run, feeder) in enumerate(opened):
            if i not in done:
                ids, mask = self.prompt(run[3] if len(run) > 3 else context, batch, spread)
                try:
                    seconds, token = prefill(feeder, ids, mask)
                except ValueError as err:
                    print(f"bench: skipping {run[0]} keep={run[1]:g} context={context}: {err}")
                    feeder.close()
                    continue
                done[i] = (run, feeder, mask, {"prefill_s": seconds}, token)
            out.append(done[i])
        return out

    def _line(self, method, keep, options, context, batch, steps, warmup, timing, all_times, cache,
              schedule, run_context, mask, spread, decoder: _Decoder) -> dict:
        stats = cache.stats()
        at_prefill = decoder.at_prefill
        times = all_times[warmup:]
        decode_ms = statistics.median(times)
        prompt_tokens = run_context * batch if mask is None else int(mask.sum())
        full_kv = kv_bytes(self.geometry, prompt_tokens, 1, self.dtype)
        if self.device.type == "cuda":
            peak, note = torch.cuda.max_memory_allocated(self.device), "cuda max_memory_allocated"
        else:
            peak, note = stats["device_bytes"], CPU_MEMORY_NOTE
        decode_s = sum(all_times) / 1000  # every decode step of this cache, warm-up included
        # time counters a method reports (stats keys ending in "_s"), what the decode steps added, as a
        # share of the decode time; what the prefill spent is reported apart (prefill_time_counters)
        shares = {name: (value - at_prefill.get(name, 0.0)) / decode_s for name, value in _time_counters(stats).items()}
        shares = {name: share for name, share in shares.items() if share > 0}
        extra = {}
        if run_context != context:
            extra["natural_limit"] = context
        if mask is not None:
            extra["length_spread"] = spread
            extra["prompt_lengths"] = mask.sum(-1).tolist()
        return {
            "kind": "decode", **self.key(method=method, keep=keep, options=_jsonable(options), context=run_context,
                                         batch=batch, steps=steps, warmup=warmup, schedule=schedule, **extra),
            **timing, "decode_ms": decode_ms, "decode_ms_steps": times,
            "tokens_per_s": batch * 1000.0 / decode_ms, "peak_memory_bytes": int(peak), "peak_memory_note": note,
            "cache": _jsonable(stats), "weight_bytes": self.weight_bytes, "kv_full_bytes": full_kv,
            "read_bytes_per_token": self.weight_bytes + stats["keep_fraction"] * full_kv,
            "weight_resident_bytes": self.resident_bytes,
            **transfer_fields(stats, decoder.bytes_at_prefill, decoder.bytes_at_timed, steps, batch, full_kv),
            "time_shares": shares,
            "prefill_time_counters": {name: value for name, value in at_prefill.items() if value > 0},
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


def _needs_profile(options: dict) -> bool:
    """Whether HeteroCache with these options needs a head profile it was not given: the paper's modes
    and ``weighting="profile"`` do; the default (dynamic retrieval, uniform budgets) does not."""
    from heterocache.methods.base import build_method

    if "profile" in options:
        return False
    method = build_method("heterocache", **options)
    return not method.dynamic or method.split == "profile"


def _prompt_kind(args) -> str:
    """``--prompt``: as given; by default essays where the model has a tokenizer (``--model``), random ids for
    a random-weight ``--model-config`` model."""
    prompt = getattr(args, "prompt", None)
    return prompt or ("random" if args.model_config else "essays")


def run_bench(args, contexts: list[int], methods: list[str], keeps: list[float], batches: list[int],
              options: dict[str, dict], devices: list | None = None) -> int:
    """Measure the grid (FullKV + every method x keep) at every context x batch; arguments already checked.
    ``devices`` (``--project``): GPU presets every measured line is projected onto (bench/project.py)."""
    from heterocache.models import is_embedded

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bench = Bench(*load_model_for_bench(args), seed=args.seed, prompt=_prompt_kind(args))
    limit = bench.geometry["max_positions"]
    if limit and max(contexts) + args.warmup + args.steps + 1 > limit:
        raise ValueError(f"--context {max(contexts)} + {args.warmup + args.steps + 1} decode tokens exceeds the "
                         f"model's {limit} positions")
    for label in [m for m in methods if base_method(m) == "heterocache" and _needs_profile(options.get(m, {}))]:
        if args.model_config:
            print(f"bench: skipping {label}: its mode needs a head profile and a random-weight --model-config "
                  f"model has none; pass --option {label}.profile=PATH (a profile of this very model) to include it")
            methods = [m for m in methods if m != label]
        elif is_embedded(bench.model):
            print(f"bench: {label} uses the embedded model's cached head profile (the first calibration "
                  "takes minutes)")
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench: {bench.model_tag} on {bench.device} ({bench.dtype}); weights read per decode token "
          f"{megabytes(bench.weight_bytes)} MB")
    schedule = "interleaved" if args.interleave else "sequential"
    grid = method_grid(methods, keeps)

    spread = args.length_spread

    def decode_key(method: str, keep: float, context: int, batch: int) -> dict:
        extra = {"length_spread": spread} if spread > 0 and batch > 1 else {}
        return {"kind": "decode", **bench.key(method=method, keep=keep, options=_jsonable(options.get(method, {})),
                                              context=context, batch=batch, steps=args.steps, warmup=args.warmup,
                                              schedule=schedule, **extra)}

    def max_batch_key(method: str, keep: float, context: int) -> dict:
        return {"kind": "max_batch", **bench.key(method=method, keep=keep, options=_jsonable(options.get(method, {})),
                                                 context=context, batch=None, steps=None, warmup=None)}

    with open_results(out_dir) as results:
        settings = [(context, batch) for context in contexts for batch in batches]
        for (context, batch), todo in pending(settings, grid,
                                              lambda s, m, k: result_key(decode_key(m, k, *s)) in results):
            runs = [(method, keep, options.get(method, {})) for method, keep in todo]
            # the natural limit of keep r: full at r * context tokens, in the same group as the methods
            natural = [("full", keep, options.get("full", {}), round(keep * context))
                       for keep in (keeps if args.natural_limit else []) if round(keep * context) >= 1]
            if args.interleave:
                if runs[0][0] != "full":  # the reference must share the schedule: measure it again
                    runs.insert(0, ("full", 1.0, options.get("full", {})))
                groups = [runs + natural]
            else:
                groups = [[run] for run in runs + natural]
            for group in groups:
                for line in bench.measure(group, context, batch, args.steps, args.warmup, schedule, spread,
                                          shared=not args.no_shared_prefill):
                    results.append(line)
                    label = line["method"] if "natural_limit" not in line else "full (natural limit)"
                    print(f"  {label:13s} keep={line['keep']:<5g} context={line['context']:<6d} batch={batch:<3d} "
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
        write_report(results.lines, bench.model_tag, out_dir, devices or [])
    return 0
