"""launch/submit.sh end to end: a real `ray start --head` and `ray job submit` on this machine;
the W&B key reaches the job through its runtime env and no file Ray or selfclust writes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli_runs import ROOT, submit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _files_holding(root: Path, needle: str) -> list[Path]:
    """Every regular file under root whose bytes contain needle (sockets, fifos skipped)."""
    return [f for f in root.rglob("*") if f.is_file() and needle.encode() in f.read_bytes()]


@pytest.mark.slow
def test_submit_runs_job_on_real_cluster(digits_npz: Path, tmp_path: Path) -> None:
    """A real `ray start --head` + `ray job submit` through launch/submit.sh, end to end."""
    from ray.job_submission import JobSubmissionClient

    shards = tmp_path / "shared" / "shards" / "digits"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfclust.cli",
            "shard",
            str(digits_npz),
            str(shards),
            "--shard-size",
            "400",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    key = "sk-test-" + "5a" * 12
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "WANDB_MODE": "offline",
        "RAY_DEDUP_LOGS": "0",
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    temp = Path(f"/tmp/sct{os.getpid()}")  # short: Ray's unix sockets live under it
    temp.mkdir(exist_ok=True)
    log = (temp / "head.log").open("w")
    head = subprocess.Popen(  # started like the cluster YAMLs' `ray start`: Python logs at WARNING
        [bin_dir + "/ray", "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         f"--dashboard-port={dash}", "--include-dashboard=true", f"--temp-dir={temp}",
         # other Ray instances may run on this machine: no default ports
         f"--dashboard-agent-listen-port={_free_port()}",
         f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         "--disable-usage-stats"],
        env={**env, "RAY_LOGGER_LEVEL": "warning"}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the dashboard's job API takes a few seconds to come up
            try:
                client = JobSubmissionClient(address)
                break
            except ConnectionError:
                assert head.poll() is None, (temp / "head.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "Ray head did not come up in 120 s"
                time.sleep(1)
        quick = ["model.widths=[8,16]", "method.heads=2", "method.relabels=2", "optim.epochs=1",
                 "optim.batch_size=64", "trainer.num_workers=1", "method.init=random",
                 f"data.train={shards}"]  # fmt: skip
        for _ in range(15):  # the head's job agent starts a little after the HTTP server
            r = submit(
                "--name", "digits-001", "--root", str(tmp_path / "shared"), "--address", address,
                "configs/quickstart.yaml", *quick, env={**env, "WANDB_API_KEY": key}, timeout=600,
            )  # fmt: skip
            if "No available agent" not in r.stderr:
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        run_dir = tmp_path / "shared" / "runs" / "digits-001"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["epochs"] == 1 and summary["num_samples"] == 1797
        jobs = [j for j in client.list_jobs() if (j.metadata or {}).get("selfclust_run")]
        assert len(jobs) == 1 and jobs[0].submission_id.startswith("digits-001-")
        assert jobs[0].status == "SUCCEEDED"
        # the key reached the job through its runtime env ...
        assert jobs[0].runtime_env["env_vars"]["WANDB_API_KEY"] == key
        # ... and nothing wrote it to disk: not selfclust (run dir, shards), not Ray (every
        # log, job and runtime env file under the head's --temp-dir). Without the YAMLs'
        # RAY_LOGGER_LEVEL=warning, logs/runtime_env_agent.log holds it (Ray 2.60).
        assert _files_holding(tmp_path, key) == []
        assert _files_holding(temp, key) == []
    finally:
        head.terminate()
        log.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)
        # `ray start` records its address for later drivers; a terminated head leaves it.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{gcs}"):
            current.unlink()
