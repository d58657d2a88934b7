#!/usr/bin/env bash
# One short GPU check (docs/DESIGN.md s.8): the Triton / CUDA kernel tests on the GPU, then the
# Llama-3.1-8B-shaped bench (random weights, 8 of its 32 layers) at 32K tokens, FullKV / SnapKV /
# HeteroCache measured with its slow-tier byte split, printed beside the roofline's projection for
# the same GPU. Meant for a lent device (`run` tool): under 5 minutes on an H200.
#   bash bench/gpu_check.sh            # PY=.venv/bin/python, OUT=/tmp/gpu_check by default
# Not yet run on a GPU (no device was lent to the session that wrote it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/gpu_check}
GPU=${GPU:-h200}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY -m pytest -q tests/test_triton_kernel.py tests/test_triton_dispatch.py tests/test_full_equivalence.py \
    tests/test_syncfree.py tests/test_syncfree_kernel.py -p no:cacheprovider
$PY -m heterocache bench --model-config llama-3.1-8b --layers 8 --device cuda --dtype bfloat16 --context 32k \
    --methods full,snapkv,heterocache,heterocache@spec --option heterocache@spec.prefetch=speculate --keep 0.25,0.1 \
    --steps 10 --warmup 3 --interleave --project "$GPU" --out "$OUT"
cat "$OUT/table.md"
