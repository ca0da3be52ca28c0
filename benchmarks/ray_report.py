"""Benchmark: how long one checkpoint report blocks training, at Ray Train's default controller
poll interval (2 s) and at selfclust's (selfclust.launch.report_poll_interval), in one run.

Each case starts a local Ray cluster, runs a TorchTrainer of ``--workers`` CPU workers that
report ``--reports`` checkpoints (a ``--mib`` MiB state.pt from rank 0, as the trainer does)
and prints the median seconds per ``ray.train.report`` call after the first.

    python benchmarks/ray_report.py --workers 2 --reports 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CASE = r"""
import json, os, sys, tempfile, time
import torch, ray, ray.train
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

workers, reports, mib, storage = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]

def loop(_):
    rank, times = ray.train.get_context().get_world_rank(), []
    for i in range(reports):
        d = tempfile.mkdtemp()
        if rank == 0:
            torch.save({"w": torch.zeros(int(mib * 2**18))}, os.path.join(d, "state.pt"))
        ckpt = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
        t = time.perf_counter()
        ray.train.report({"i": i}, checkpoint=ckpt)
        times.append(time.perf_counter() - t)
    if rank == 0:
        with open(os.path.join(storage, "times.json"), "w") as f:
            json.dump(times, f)

ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=workers),
             run_config=RunConfig(storage_path=storage,
                                  checkpoint_config=CheckpointConfig(num_to_keep=2))).fit()
"""


def run_case(args: argparse.Namespace, poll_s: float | None) -> list[float]:
    env = {**os.environ, "RAY_TRAIN_V2_ENABLED": "1"}
    env.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    if poll_s is not None:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(poll_s)
    with tempfile.TemporaryDirectory() as storage:
        cmd = [sys.executable, "-c", CASE, str(args.workers), str(args.reports), str(args.mib),
               storage]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        with open(os.path.join(storage, "times.json")) as f:
            return json.load(f)[1:]  # the first report has no earlier poll to wait for


def main() -> None:
    from selfclust.launch import report_poll_interval

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reports", type=int, default=8)
    ap.add_argument("--mib", type=float, default=1.0, help="size of rank 0's state.pt")
    args = ap.parse_args()
    ours = report_poll_interval(args.workers)
    rows = [("Ray's default (2 s poll)", run_case(args, None)),
            (f"selfclust ({ours:g} s poll)", run_case(args, ours))]  # fmt: skip
    base = statistics.median(rows[0][1])
    print(f"{args.workers} workers, {args.reports} reports of a {args.mib:g} MiB checkpoint")
    print("| poll interval | seconds per report (median) | ratio |\n|---|---|---|")
    for name, times in rows:
        med = statistics.median(times)
        print(f"| {name} | {med:.3f} | {base / med:.1f}× |")


if __name__ == "__main__":
    main()
