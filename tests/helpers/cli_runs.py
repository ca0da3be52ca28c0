"""Real `selfclust train` runs in subprocesses, shared by the end-to-end and fault tests: the
command, bounded waits, and the metrics records a run leaves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]  # the repository
# The reference run. Long enough (8 epochs × 28 steps) that faults injected around steps 52
# and 90 land mid-run; two heads so that the summary's best-head rule has a choice. Label
# updates at steps 52, 108 and 165, all mid-epoch (relabel_power 1.05; the quickstart's 1.0
# would put all three on epoch ends), so a worker killed in the first pass cuts an epoch too.
FAULT_RUN = [
    "model.widths=[8,16]",
    "method.heads=2",
    "method.relabels=4",
    "method.relabel_start=0.0",
    "method.relabel_power=1.05",
    "optim.epochs=8",
    "optim.batch_size=64",
    "checkpoint.every_steps=25",
    "checkpoint.keep_last=2",
    "trainer.log_every=5",
    "trainer.max_failures=2",
    "wandb.mode=offline",
]
STEPS_PER_EPOCH = 1797 // 64
STEPS = 8 * STEPS_PER_EPOCH
TIMEOUT_S = 420


def train_cmd(shards: Path, run: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "selfclust.cli",
        "train",
        "configs/quickstart.yaml",
        "--run-dir",
        str(run),
        f"data.train={shards}",
        *FAULT_RUN,
        *extra,
    ]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "RAY_DEDUP_LOGS": "0"}
    out = log.open("w")
    # A new session: the driver, its local Ray cluster and the workers share one process group.
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        rc = proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(
            f"run did not finish in {TIMEOUT_S}s:\n{log.read_text()[-4000:]}"
        ) from None
    assert rc == 0, log.read_text()[-4000:]


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def wait_for(
    what: str, cond: Callable[[], bool], proc: subprocess.Popen, log: Path, poll: float = 0.05
) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no {what} after {TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
        time.sleep(poll)


def reached(run: Path, step: int) -> Callable[[], bool]:
    return lambda: any(r.get("step", -1) >= step and "loss" in r for r in records(run))


def complete_checkpoints(run: Path) -> list[Path]:
    from selfclust.checkpoint import is_complete

    return [p for p in run.glob("ray/*/checkpoint_*") if is_complete(p)]


SUBMIT = ROOT / "launch" / "submit.sh"


def submit(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess:
    """``bash launch/submit.sh *args`` from the repository, output captured."""
    return subprocess.run(
        ["bash", str(SUBMIT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        **kw,
    )
