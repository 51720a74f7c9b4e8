#!/usr/bin/env bash
# The benchmark suite at the backbone's native 224 px on one CUDA GPU (not run yet: the CPU results in
# BENCHMARKS.md are at 64 px). Same protocol, same code; only the resolution, the device and the thread count
# change. Results go to benchmarks/results/gpu_224px/ so they never overwrite the CPU numbers.
#
#   bash benchmarks/gpu_suite.sh            # from the repository root, with .venv set up (CUDA build of torch)
#
# Expected cost on a recent data-centre GPU: feature extraction is bound by the single-process PIL
# preprocessing (~100k images: ~60k database + 40k training views), a few minutes; the 15 MeCoQ runs train
# heads on cached features (minutes each at most); the search curve runs on the CPU (faiss-cpu and the native
# backend search CPU tensors).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT=benchmarks/results/gpu_224px
THREADS=${THREADS:-$(nproc)}
mkdir -p "$OUT"
export PYTHONPATH=src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

"$PYTHON" - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("No CUDA device visible to torch: this suite is for a GPU machine (use the CPU commands in BENCHMARKS.md).")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
EOF

# 1. quality protocol at 224 px (features cached under benchmarks/cache/fashion_mnist_224px)
"$PYTHON" benchmarks/bench_quality.py --image-size 224 --device cuda --threads "$THREADS" \
    --output "$OUT/fashion_mnist.json" 2>&1 | tee "$OUT/bench_quality.log"

# 2. speed: training step split, encode vs backbone at 64 and 224 px, batch 128, on the GPU; search curve
"$PYTHON" benchmarks/bench_speed.py --device cuda --image-sizes 64,224 --batch-size 128 --threads "$THREADS" \
    --output "$OUT/speed.json" 2>&1 | tee "$OUT/bench_speed.log"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" || true
echo "Results in $OUT"
