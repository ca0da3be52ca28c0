"""Short DEPICT, DGG and SeLa runs on one GPU through selfclust's worker loop (no Ray).

    python benchmarks/gpu_runs.py                     # all three on cuda:0
    python benchmarks/gpu_runs.py --methods depict    # one of them
    python benchmarks/gpu_runs.py --out runs.json     # the table as JSON as well
    python benchmarks/gpu_runs.py --device cpu        # the same runs on the CPU (a dry run)

Each run is ``Trainer.run`` on the built-in MNIST test set, with every clustering step of the
method (initial partition, head fit, label refreshes, DEPICT's manifold refresh, DGG's graph)
on the GPU: the code that ``selfclust train trainer.use_gpu=true`` runs in each Ray worker,
started here on one rank of a ``cpu:gloo,cuda:nccl`` process group instead of through Ray
(Ray's wheel is too large to carry to a bare GPU machine). A run that fails prints its error and
the others still run. Prints one row per run: seconds, ACC/NMI and the model digest.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from selfclust.config import load_config  # noqa: E402
from selfclust.data.preflight import resolve_data  # noqa: E402
from selfclust.train.context import WorkerContext  # noqa: E402
from selfclust.train.loop import train_loop  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHORT = ["data.train=mnist_test", "trainer.log_every=50", "wandb.mode=disabled"]
# Short versions of the shipped recipes (those of benchmarks/digests.sh, plus a manifold
# refresh for DEPICT so that its manifold step runs too).
RUNS: dict[str, tuple[str, list[str]]] = {
    "depict": (
        "depict_mnist_test.yaml",
        [
            "method.pretrain_epochs=1",
            "optim.epochs=2",
            "method.relabels=2",
            "method.manifold_relabels=1",
            "method.manifold_init_candidates=1",
            "method.conv_channels=[16,16]",
        ],
    ),  # fmt: skip
    "dgg": (
        "dgg_mnist_test.yaml",
        [
            "method.pretrain_epochs=2",
            "optim.epochs=2",
            "method.relabels=2",
            "method.cluster_init=kmeans",
            "method.kmeans_restarts=2",
            "method.hidden=[64,64]",
        ],
    ),  # fmt: skip
    "sela": ("quickstart.yaml", ["optim.epochs=2", "method.relabels=2", "method.init=kmeans"]),
}


def one_run(name: str, device: torch.device, root: Path) -> dict[str, Any]:
    config, overrides = RUNS[name]
    cuda = device.type == "cuda"
    gpu = [f"trainer.use_gpu={str(device.type == 'cuda').lower()}"]
    cfg = load_config(CONFIGS / config, [*SHORT, *overrides, *gpu])
    ctx = WorkerContext(
        rank=0,
        world_size=1,
        device=device,
        report=lambda metrics, path: None,
        checkpoint_dir=None,
        run_dir=root / name,
        wandb_id=name,
    )
    ctx.run_dir.mkdir(parents=True)
    cfg = resolve_data(cfg, root)  # the built-in MNIST test set, sharded once under root
    t = time.perf_counter()
    try:
        s = train_loop(cfg, ctx)
    except Exception as e:  # a failure is a result: print it and go on with the next run
        traceback.print_exc()
        return {"method": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    return {
        "method": name,
        "ok": True,
        "seconds": round(time.perf_counter() - t, 1),
        "acc": s["acc"],
        "nmi": s["nmi"],
        "digest": s["model_digest"][:16],
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--device", default="cuda:0")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/gpu_runs.py needs a CUDA GPU and found none")
        torch.cuda.set_device(device)
    with socket.socket() as sock:  # a free port for the one-rank process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"  # as launch.py's
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rows.append(one_run(name, device, Path(tmp)))
    dist.destroy_process_group()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{where}, torch {torch.__version__}\n")
    print("| method | result | s | ACC | NMI | digest | peak GiB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if r["ok"]:
            print(
                f"| {r['method']} | ok | {r['seconds']} | {r['acc']:.3f} | {r['nmi']:.3f} "
                f"| {r['digest']} | {r['peak_gib']} |"
            )
        else:
            print(f"| {r['method']} | FAILED: {r['error']} | | | | | |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
