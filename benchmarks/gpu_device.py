"""The GPU machine as selfclust's worker preflight sees it: driver, GPU, compute capability,
native bf16, torch's CUDA and arch list, the preflight's verdict for ``trainer.use_gpu=true``
with ``trainer.precision=auto``, the free memory and faiss's GPU count.

    python benchmarks/gpu_device.py

Part of benchmarks/gpu_check.sh; exits non-zero when the preflight refuses the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from selfclust.train.gpu import GpuError, check_gpu, read_facts  # noqa: E402


def main() -> None:
    device = torch.device("cuda", 0)
    f = read_facts(device)
    rows = [
        ("torch", f"{f.torch_version} (CUDA {f.torch_cuda})"),
        ("driver", f.driver or "unknown"),
        ("CUDA available", str(f.cuda_available)),
    ]
    if f.cuda_available:
        free, total = torch.cuda.mem_get_info(device)
        rows += [
            ("GPU", f.gpu),
            ("native bf16", str(f.native_bf16)),
            ("torch arch list", " ".join(f.arch_list)),
            ("memory free / total", f"{free / 2**30:.1f} / {total / 2**30:.1f} GiB"),
        ]
    try:
        note = check_gpu(f, "auto")
        verdict = f"passes{': ' + note if note else ''}"
    except GpuError as e:
        verdict = f"refuses: {e}"
    rows.append(("preflight (use_gpu, precision auto)", verdict))
    try:
        import faiss

        rows.append(("faiss GPUs", str(faiss.get_num_gpus())))
    except ImportError as e:
        rows.append(("faiss", f"not importable: {e}"))
    print("| | |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if verdict.startswith("refuses"):
        sys.exit(1)


if __name__ == "__main__":
    main()
