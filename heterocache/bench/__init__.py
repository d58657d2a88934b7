"""``heterocache bench``: prefill time, decode ms/token, memory and speedup vs FullKV per method.

Protocol (PEERS.md): a prompt of each context length, essay text by default with ``--model``
(retrieval methods' work depends on real attention) or random token ids (``--prompt random``, the
default for ``--model-config`` models), one prefill forward, then single-token forwards feeding back the argmax;
decode time = median of ``--steps`` steps after ``--warmup`` warm-up steps, ``torch.cuda.synchronize``
around every timed region on CUDA. Every method is compared with ``full`` measured by the same
command; ``--interleave`` times the methods' decode steps round-robin instead of one after the
other, so on a shared, loaded machine all of them see the same conditions. Next to each speedup
stands the memory-bandwidth bound ``(W + KV) / (W + r * KV)`` (W = weight bytes read per token,
KV = full KV bytes, r = measured kept fraction), and the bytes each method read from its slow tier
per decode token over the timed steps only, critical-path (an attention waits for them) and
prefetched (issued at least a layer ahead), in MB and as a share of the full KV.

``--project h200,h100,a100`` (or ``all``) projects every line onto those GPUs with a memory roofline
(bench/roofline.py: step = (W + device KV + index) / HBM + critical / link + the prefetched bytes'
excess over the HBM time; FullKV = (W + KV) / HBM), at the measured batch and at the largest batch
FullKV fits in HBM; ``--hbm-tbps``, ``--link-gbps``, ``--hbm-gb`` override the presets. Without
running a model, ``--project h200 --model-config llama-3.1-8b --context 131072 --batch 1,8`` with
``--moved-share-from DIR`` (each method's shares from the bench results in DIR, nearest context)
or ``--methods heterocache --keep 0.25 --moved-share 0.034 [--kept-fraction 0.216]`` projects that
shape in bf16 (bench/project.py; ``--out DIR`` writes projection.json / projection.md).

With ``--interleave`` our methods' runs on one prompt share one prefill forward (heterocache/fanout.py;
the prefill is exact, so every cache ends up as its own prefill would leave it): a line's ``prefill_s``
is then the time to first token that method alone would take, the shared forward less the other
caches' ``compress_s`` (its own ``compress_s`` stays in), next to the measured ``shared_prefill_s`` and
``shared_prefill_jobs``. The natural-limit FullKV runs (shorter prompts) and peers prefill alone;
``--no-shared-prefill`` prefills every run alone. The sequential schedule measures each run alone.

Results go to ``DIR/results.jsonl`` one line per (method, keep, context, batch) as they finish,
through the shared result log (heterocache/eval/results.py: rerunning skips finished lines; a line
cut mid-write by a kill is dropped and measured again), then ``results.json`` (rows with the derived columns),
``table.md`` and ``decode_ms.png``.

Modules: ``cli.py`` (arguments, checked before the model loads), ``run.py`` (measurements),
``models.py`` (architecture presets, byte accounting), ``report.py`` (derived columns, table, plot),
``roofline.py`` (the projected GPU step, pure functions, presets), ``project.py`` (workloads from
measured lines or shapes, projection tables).
"""
