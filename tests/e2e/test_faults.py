"""Real faults against real Ray runs: a worker killed by pid inside a mid-epoch label pass and
later the driver killed and the command rerun (one run, interrupted twice), a checkpoint write
killed half-way. Each interrupted run must finish with the same model (``model_digest``) as
the uninterrupted one. Every wait is bounded.

A simulated two-node cluster (``ray.cluster_utils.Cluster``) has its training node drained
for preemption, then lost and replaced: the just-in-time checkpoint is taken on the notice and
the run finishes on the new node with the same model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli_runs import (
    FAULT_RUN,
    STEPS,
    STEPS_PER_EPOCH,
    finish,
    reached,
    records,
    start,
    train_cmd,
    wait_for,
)


def train_workers(session: int) -> list[int]:
    """Pids of the Ray Train worker processes in this session (by their process title)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "RayTrainWorker" in title and os.getsid(int(entry.name)) == session:
                pids.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return sorted(pids)


@pytest.fixture
def shards(digits_shards: Path) -> Path:
    return digits_shards


@pytest.fixture
def reference(reference_run: tuple[Path, dict]) -> dict:
    """The uninterrupted run's summary."""
    return reference_run[1]


def label_pass(run: Path) -> dict | None:
    """The first label update's ``label_pass_start`` record (not the initial k-means), if any."""
    recs = records(run)
    return next(
        (r for r in recs if r.get("event") == "label_pass_start" and not r["initial"]), None
    )


@pytest.mark.slow
def test_worker_killed_in_label_pass_then_driver_killed_resumes_exactly(
    shards: Path, reference: dict, tmp_path: Path
) -> None:
    """One run interrupted twice: a Ray Train worker SIGKILLed inside a label pass that falls
    mid-epoch (Ray restarts the group from the checkpoint before the pass, which is redone),
    later the driver with its whole Ray cluster (the same command is rerun). It must end with
    the uninterrupted run's model and W&B run id."""
    run, log = tmp_path / "run", tmp_path / "log.txt"
    cmd = train_cmd(shards, run)
    proc = start(cmd, log)
    wait_for("step 5", reached(run, 5), proc, log)
    workers = train_workers(proc.pid)
    assert len(workers) == 2, workers
    # The pass over the digits takes a second or two: poll fast and kill as soon as it starts.
    wait_for("a label pass", lambda: label_pass(run) is not None, proc, log, poll=0.01)
    os.kill(workers[1], signal.SIGKILL)
    killed = time.time()
    started = label_pass(run)
    assert started is not None
    at = started["step"]
    print(f"worker killed {killed - started['time']:.3f} s into the label pass at step {at}")
    assert 0 < at - started["epoch"] * STEPS_PER_EPOCH < STEPS_PER_EPOCH, started  # mid-epoch

    wait_for(
        "the restart", lambda: any(r.get("event") == "resumed" for r in records(run)), proc, log
    )
    recs = records(run)
    first = recs[: next(i for i, r in enumerate(recs) if r.get("event") == "resumed")]
    # The kill landed inside the pass: the lost attempt never logged that update's result, and
    # the restart went back to a checkpoint before it.
    assert not [r for r in first if r.get("event") == "relabel" and r["step"] == at], first
    assert recs[len(first)]["step"] < at
    wait_for("step 90", reached(run, 90), proc, log)
    wandb_id = json.loads((run / "run.json").read_text())["wandb_id"]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray cluster and the workers at once
    proc.wait(30)
    assert not (run / "summary.json").exists()

    proc = start(cmd, tmp_path / "log2.txt")
    finish(proc, tmp_path / "log2.txt")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["model_digest"] == reference["model_digest"]
    assert json.loads((run / "run.json").read_text())["wandb_id"] == wandb_id
    recs = records(run)
    marks = [i for i, r in enumerate(recs) if r.get("event") == "resumed"]
    resumed = [recs[i] for i in marks]
    # one restart by Ray (worker lost), one by the rerun command (driver lost), in order
    assert len(resumed) == 2, resumed
    assert 0 < resumed[0]["step"] < resumed[1]["step"] < STEPS and resumed[0]["step"] < at
    # the group Ray restarted redid the interrupted pass, once
    redone = [r for r in recs[marks[0] : marks[1]] if r.get("event") == "relabel"]
    assert [r["step"] for r in redone].count(at) == 1, redone
    # the same W&B run continues (offline: one directory per segment with the same id: the
    # first worker group, the group Ray restarted, the rerun, the pictures logged after training)
    assert len(list(run.glob(f"wandb/offline-run-*-{wandb_id}"))) == 4


def test_checkpoint_write_killed_half_way_never_becomes_latest(tmp_path: Path) -> None:
    import torch

    from selfclust.checkpoint import IncompatibleCheckpoint, is_complete, read_state, write_state
    from selfclust.rundir import latest_checkpoint

    storage = tmp_path / "run" / "ray" / "selfclust-test"
    storage.mkdir(parents=True)
    shutil.move(write_state({"format": 1, "x": torch.arange(4)}), storage / "checkpoint_000001")
    assert latest_checkpoint(tmp_path / "run") == storage / "checkpoint_000001"

    # A real writer process killed while torch.save is streaming a large state.
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import torch; from selfclust.checkpoint import write_state; "
            "write_state({'format': 1, 'x': torch.ones(400_000_000, dtype=torch.uint8)})",
        ],
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 1 << 20 for p in tmpdir.glob("*/state.pt.partial")):
        assert writer.poll() is None, "writer finished before it could be killed"
        assert time.monotonic() < deadline, "writer never started writing"
        time.sleep(0.01)
    writer.kill()
    writer.wait(30)
    (cut,) = list(tmpdir.iterdir())
    assert not (cut / "state.pt").exists() and not is_complete(cut)

    # Whatever was cut off (no state file, no digest, or a truncated copy in storage) is
    # never the latest and is refused by name when given directly.
    shutil.move(cut, storage / "checkpoint_000002")
    copy = storage / "checkpoint_000003"
    copy.mkdir()
    full = (storage / "checkpoint_000001" / "state.pt").read_bytes()
    (copy / "state.pt").write_bytes(full[: len(full) // 2])
    (copy / "state.sha256").write_bytes(
        (storage / "checkpoint_000001" / "state.sha256").read_bytes()
    )
    assert latest_checkpoint(tmp_path / "run") == storage / "checkpoint_000001"
    with pytest.raises(IncompatibleCheckpoint, match="incomplete or corrupt"):
        read_state(copy)
    with pytest.raises(FileNotFoundError, match="state.pt"):
        read_state(storage / "checkpoint_000002")


CLUSTER_SCRIPT = """
import json, os, sys, threading, time
from pathlib import Path
# Ray polls for drain notices every 5 s by default; the run is ~15 s of training here, so
# poll faster that the notice lands mid-run (the variable is propagated to the workers).
os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.2"
import ray
from ray.cluster_utils import Cluster
from ray.core.generated import autoscaler_pb2
from selfclust.config import load_config
from selfclust.launch import train

shards, run, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
spot = cluster.add_node(num_cpus=2)  # both training workers land here
cluster.wait_for_nodes()
ray.init(address=cluster.address)
cfg = load_config("configs/quickstart.yaml", [f"data.train={shards}", *overrides])
out = {}
thread = threading.Thread(target=lambda: out.update(summary=train(cfg, run)), daemon=True)
thread.start()

def events(name):
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    recs = []
    for x in lines:
        try:
            recs.append(json.loads(x))
        except ValueError:
            pass
    return [r for r in recs if r.get("event") == name or (name == "train" and "loss" in r)]

def wait(what, cond, limit=300):
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end or not thread.is_alive():
            sys.exit(f"no {what}")
        time.sleep(0.05)

wait("step 30", lambda: any(r["step"] >= 30 for r in events("train")))
cluster.add_node(num_cpus=2)  # the replacement node
cluster.wait_for_nodes()
gcs = ray._raylet.GcsClient(address=cluster.address)
deadline_ms = int(time.time() * 1000) + 120_000  # the test reclaims the node itself, below
reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
accepted, why = gcs.drain_node(spot.node_id, reason, "spot reclaim (test)", deadline_ms)
assert accepted, why
wait("preemption notice", lambda: events("preemption_notice"))
step = events("preemption_notice")[0]["step"]

def registered():  # Ray's checkpoint manager holds one from the notice's step or later
    try:
        snap = next(run.glob("ray/*/checkpoint_manager_snapshot.json")).read_text()
        results = json.loads(snap)["checkpoint_results"]
    except (StopIteration, ValueError, KeyError):
        return False
    return any(r.get("metrics", {}).get("global_step", -1) >= step for r in results)

# The reclaim comes once the just-in-time checkpoint is in (a real deadline is seconds to
# minutes away; a fixed one here would race the checkpoint on a loaded machine).
wait("the just-in-time checkpoint", registered)
cluster.remove_node(spot)
print(f"REMOVED {time.time()}", flush=True)  # benchmarks/preemption.py times the fault from here
wait("restart", lambda: events("resumed"))
thread.join(300)
print("RESULT " + json.dumps(out.get("summary")))
"""


@pytest.mark.slow
def test_spot_node_preempted_then_replaced(shards: Path, reference: dict, tmp_path) -> None:
    run, log = tmp_path / "run", tmp_path / "log.txt"
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    cmd = [sys.executable, str(script), str(shards), str(run), *FAULT_RUN]
    proc = start(cmd, log)
    finish(proc, log)
    summary = json.loads(log.read_text().split("RESULT ", 1)[1].splitlines()[0])
    assert summary["model_digest"] == reference["model_digest"]
    notice = [r for r in records(run) if r.get("event") == "preemption_notice"]
    resumed = [r for r in records(run) if r.get("event") == "resumed"]
    assert len(notice) == 1 and notice[0]["deadline_ms"] > 0
    # the restart continued from the just-in-time checkpoint (or a later one), not before it
    assert len(resumed) == 1 and resumed[0]["step"] >= notice[0]["step"]
