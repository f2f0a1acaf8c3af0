#!/usr/bin/env bash
# cifar10-real on a GPU machine: build the benchmark, then train ResNet-18 with MSP and Outlier
# Exposure at OpenOOD v1.5's recipe, cut to fit a time budget (bench/gpu_cifar10.py says how).
#   bash bench/gpu_cifar10.sh [REAL_IMAGES_DIR] [BUDGET_S]
# Defaults: ../shared/data/real-images and 420 s of training (about 8 minutes in all with the
# build, the probe and two Ray start-ups). Prints one JSON object on stdout, progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-../shared/data/real-images}
BUDGET=${2:-420}
WORK=${OOD_RAY_GPU_WORK:-${TMPDIR:-/tmp}/ood_ray_gpu_cifar10}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || echo "no nvidia-smi: running on CPU" >&2
if [ ! -f "$WORK/benchmark.json" ]; then
  ood-ray data build --spec benchmarks/cifar10-real.yaml --root "$ROOT" --out "$WORK" >&2
fi
python bench/gpu_cifar10.py --data "$WORK/benchmark.json" --budget "$BUDGET"
