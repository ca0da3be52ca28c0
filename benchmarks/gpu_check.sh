#!/usr/bin/env bash
# The GPU check: everything selfclust's GPU path needs to show on one CUDA GPU, in one call of
# at most ~8 minutes, on a bare machine that has Python 3.12 and PyTorch but no network.
#
#   benchmarks/gpu_wheels.sh                 # first, where PyPI is reachable: wheels into .whl/
#   benchmarks/gpu_check.sh [OUT_DIR]        # then on the GPU machine, from the repository root
#
# Steps (each under its own time limit; one that fails is reported and the others still run):
#   1. install the carried wheels into /tmp/site (no network, no dependencies resolved);
#   2. the device: driver, GPU, compute capability, native bf16, torch's CUDA and arch list, the
#      worker preflight's verdict for trainer.use_gpu=true, and faiss's GPU count;
#   3. the CUDA tests: pytest -m gpu (Sinkhorn, k-means, the methods' clustering steps with the
#      model on the GPU, the sync checker on SeLa's training step);
#   4. short DEPICT, DGG and SeLa runs on the GPU through the worker loop (benchmarks/gpu_runs.py);
#   5. the Sinkhorn at ImageNet size, N = 1,281,167, K = 3000, as many of 10 heads as fit in 2 min;
#   6. SeLa's ResNet-50 training step (bf16, channels_last) against supervised ResNet-50 on the
#      same GPU, one label pass, and how many labels bf16 features would change (gpu_train.py);
#   7. k-means on the GPU (torch on CUDA, faiss-gpu where installed) against faiss on the CPU;
#   8. in the time left, the training step under torch.compile (trainer.compile=true).
# Then one table: each step's status and seconds, followed by each step's own table. Logs and
# JSON go to OUT_DIR (default $OUT, else /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.." || exit
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
py=${PYTHON:-python3}
budget=${BUDGET_S:-470}  # the whole check; a step that would start later is skipped
start=$SECONDS
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
declare -a rows

step() {  # name limit_s command...: run it, log it, record status and time
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  if ((left < 20)); then
    rows+=("| $name | skipped (the check's ${budget} s are spent) | |")
    return
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  local status=ok
  ((rc == 124 || rc == 137)) && status="timed out after ${limit} s"
  ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED (exit $rc)"
  rows+=("| $name | $status | $((SECONDS - t0)) |")
  tail -n 40 "$out/$name.log"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  step install 90 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
else
  rows+=("| install | no .whl/: run benchmarks/gpu_wheels.sh where PyPI is reachable | |")
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
step device 60 "$py" benchmarks/gpu_device.py
step cuda_tests 120 "$py" -m pytest -q -m gpu -p no:cacheprovider -o addopts=-ra \
  tests/labels/test_sinkhorn.py tests/labels/test_kmeans.py tests/methods/test_device.py \
  tests/train/test_sync_free.py
step short_runs 150 "$py" benchmarks/gpu_runs.py --out "$out/gpu_runs.json"
step sinkhorn 180 "$py" benchmarks/sinkhorn.py --gpu --heads 10 --budget-s 120
step train_step 150 "$py" benchmarks/gpu_train.py --synthetic --steps 20 --blocks 2 \
  --out "$out/gpu_train.json"
step kmeans 90 "$py" benchmarks/kmeans.py --gpu --skip-sklearn --skip-defaults
# Last, in what time is left: trainer.compile=true (Triton needs a C compiler and Python.h).
step compile 150 "$py" benchmarks/gpu_train.py --synthetic --steps 10 --blocks 1 --compile \
  --no-relabel

{
  echo
  echo "## GPU check: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1), $((SECONDS - start)) s"
  echo
  echo "| step | result | s |"
  echo "|---|---|---|"
  printf '%s\n' "${rows[@]}"
  for name in device cuda_tests short_runs sinkhorn train_step kmeans compile; do
    [ -f "$out/$name.log" ] || continue
    echo
    echo "### $name"
    grep -E '^\|' "$out/$name.log" || tail -n 5 "$out/$name.log"
  done
} | tee "$out/table.md"
