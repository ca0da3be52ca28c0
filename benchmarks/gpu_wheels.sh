#!/usr/bin/env bash
# Prepare, on a machine with PyPI, the wheels that benchmarks/gpu_check.sh installs on a bare GPU
# machine that has Python 3.12 and PyTorch but no network: what selfclust needs beyond such an
# image (webdataset, faiss, pydantic, UMAP), pinned to the versions tested
# here, for CPython 3.12 on x86-64 Linux, without their dependencies (each one is named).
#
#   benchmarks/gpu_wheels.sh            # into .whl/ (git-ignored), then carry .whl to the machine
#   benchmarks/gpu_wheels.sh DIR
#
# Ray is not among them: its wheel (~79 MB) alone is over what travels to such a machine
# (64 MiB), so gpu_check.sh runs the worker loop on one rank without Ray (benchmarks/gpu_runs.py).
# W&B is not needed either (imported only when wandb.mode is not disabled), nor POT (32 MB; the
# tests that compare with it skip without it).
set -euo pipefail
out=${1:-.whl}
mkdir -p "$out"
wheels=(
  webdataset==1.0.2 braceexpand==0.1.7
  faiss-cpu==1.15.1
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  umap-learn==0.5.12 pynndescent==0.7.0
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$out" "${wheels[@]}"
du -sh "$out"
