"""What a failure costs: seconds from the fault to training again, and steps repeated.

Runs the real CLI (a local Ray cluster, 2 workers) on sklearn's digits and injects, in turn:

- ``worker``: SIGKILL one Ray Train worker mid-epoch (no notice; Ray restarts the group);
- ``pass``: the same, as the first label update's pass over the data starts (mid-epoch); the
  restart also redoes that pass;
- ``driver``: SIGKILL the driver with its local cluster, then rerun the same command;
- ``notice``: a simulated two-node cluster whose training node is drained with reason
  PREEMPTION (tests/test_faults.py's script) and removed once the just-in-time checkpoint is
  registered; a replacement node exists. The fault time is the removal.

"Training again" is the first training step logged after the restart; "steps repeated" is the
last step logged before the fault minus the step the restart resumed from (``log_every=1``).
Usage: ``python benchmarks/preemption.py [--every-steps 25] [--faults worker pass driver notice]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
DIGITS = ROOT.parent / "shared" / "data" / "sklearn_digits" / "sklearn_digits.npz"
sys.path.insert(0, str(ROOT / "tests"))

from test_faults import CLUSTER_SCRIPT, FAULT_RUN, train_workers  # noqa: E402


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def last_step(run: Path) -> int:
    return max((r["step"] for r in records(run) if "loss" in r), default=-1)


def wait_step(run: Path, step: int, proc: subprocess.Popen) -> None:
    end = time.monotonic() + 600
    while last_step(run) < step:
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"run ended or stalled before step {step}; see {run}")
        time.sleep(0.02)


def wait_label_pass(run: Path, proc: subprocess.Popen) -> None:
    """Until the first label update's pass starts (polled fast: the pass takes 1-3 s)."""
    end = time.monotonic() + 600
    while not any(r.get("event") == "label_pass_start" and not r["initial"] for r in records(run)):
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"run ended or stalled before a label pass; see {run}")
        time.sleep(0.01)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def cost(run: Path, fault_time: float, before: int) -> dict:
    recs = records(run)
    resumed = [r for r in recs if r.get("event") == "resumed"][-1]
    after = [r for r in recs if "loss" in r and r["time"] > resumed["time"]]
    return {
        "resumed_from": resumed["step"],
        "seconds_to_training": after[0]["time"] - fault_time,
        "steps_repeated": max(0, before - resumed["step"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every-steps", type=int, default=25, help="checkpoint.every_steps")
    kinds = ["worker", "pass", "driver", "notice"]
    ap.add_argument("--faults", nargs="+", choices=kinds, default=kinds, help="which to inject")
    args = ap.parse_args()
    # the fault tests' run, logging every step, with its own checkpoint interval
    overrides = [
        o
        for o in FAULT_RUN
        if not o.startswith(("checkpoint.every_steps", "trainer.log_every", "wandb.mode"))
    ] + [f"checkpoint.every_steps={args.every_steps}", "trainer.log_every=1", "wandb.mode=disabled"]
    tmp = Path(tempfile.mkdtemp(prefix="selfclust-preempt-"))
    from selfclust.shards.write import write_shards

    shards = tmp / "digits"
    write_shards(DIGITS, shards, shard_size=400)
    base = [sys.executable, "-m", "selfclust.cli", "train", "configs/quickstart.yaml"]
    rows = {}

    def launch(name: str) -> tuple[Path, list[str], subprocess.Popen]:
        """The fault run ``name``: its run dir, its command, and the started process."""
        run = tmp / name
        cmd = [*base, "--run-dir", str(run), f"data.train={shards}", *overrides]
        return run, cmd, start(cmd, tmp / f"{name}.log")

    if "worker" in args.faults:
        run, _, proc = launch("worker")
        wait_step(run, 60, proc)
        os.kill(train_workers(proc.pid)[1], signal.SIGKILL)
        t, before = time.time(), last_step(run)
        proc.wait(600)
        rows["worker SIGKILL, no notice"] = cost(run, t, before)

    if "pass" in args.faults:
        run, _, proc = launch("pass")
        wait_step(run, 5, proc)
        workers = train_workers(proc.pid)
        wait_label_pass(run, proc)
        os.kill(workers[1], signal.SIGKILL)
        t, before = time.time(), last_step(run)
        proc.wait(600)
        rows["worker SIGKILL in a label pass"] = cost(run, t, before)

    if "driver" in args.faults:
        run, cmd, proc = launch("driver")
        wait_step(run, 60, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        t, before = time.time(), last_step(run)
        proc.wait(60)
        start(cmd, tmp / "driver2.log").wait(600)
        rows["driver SIGKILL, command rerun"] = cost(run, t, before)

    if "notice" in args.faults:
        run = tmp / "notice"
        script = tmp / "cluster.py"
        script.write_text(CLUSTER_SCRIPT)
        proc = start(
            [sys.executable, str(script), str(shards), str(run), *overrides], tmp / "n.log"
        )
        proc.wait(900)
        recs = records(run)
        notice = next(r for r in recs if r.get("event") == "preemption_notice")
        resumed = next(r for r in recs if r.get("event") == "resumed")
        gone = float((tmp / "n.log").read_text().split("REMOVED ", 1)[1].split()[0])
        before = max(r["step"] for r in recs if "loss" in r and r["time"] < resumed["time"])
        rows["spot notice, node replaced"] = cost(run, gone, before)
        print(f"notice at step {notice['step']}, node removed {gone - notice['time']:.1f} s later")

    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"checkpoint.every_steps={args.every_steps}; 2 CPU workers; digits, 28 steps/epoch")
    print(f"load average at the end (1/5/15 min): {load} on {os.cpu_count()} cores")
    print(f"{'fault':34} {'resumed from':>12} {'s to training':>14} {'steps repeated':>15}")
    for name, r in rows.items():
        print(
            f"{name:34} {r['resumed_from']:>12} {r['seconds_to_training']:>14.1f} "
            f"{r['steps_repeated']:>15}"
        )


if __name__ == "__main__":
    main()
