"""The local Ray cluster that selfclust.launch starts for a run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# In a fresh process with its own Ray temp dir: a stale cluster address file (what a killed
# `ray start` leaves), then selfclust's local cluster, then the state API from inside one of
# the cluster's workers, as Ray Train's placement-group cleaner calls it (no address given).
PROBE = textwrap.dedent(
    """
    import os, sys
    os.makedirs(os.path.join(sys.argv[1], "ray"), exist_ok=True)
    with open(os.path.join(sys.argv[1], "ray", "ray_current_cluster"), "w") as f:
        f.write("127.0.0.1:6399\\n")  # nothing listens there
    import ray
    from selfclust.config import build_config
    from selfclust.launch import _init_ray

    _init_ray(build_config({"trainer": {"num_workers": 1}}))

    @ray.remote
    class Marker:
        def ping(self):
            return 1

    @ray.remote
    def actors_seen(name):
        from ray.util.state import list_actors
        return [a.class_name for a in list_actors(filters=[("class_name", "=", name)])]

    marker = Marker.remote()
    ray.get(marker.ping.remote())
    print("SEEN", ray.get(actors_seen.remote("Marker"), timeout=60))
    ray.shutdown()
    """
)


@pytest.mark.slow
def test_workers_find_their_own_cluster_despite_a_stale_address_file() -> None:
    """Without the address selfclust gives its cluster's processes, the state API inside a
    worker reads the stale file, waits ~40 s on the dead address and fails; Ray Train's
    placement-group cleaner then stops guarding the run and each fit() waits 12 s at its end."""
    tmp = tempfile.mkdtemp(prefix="sc-", dir="/tmp")  # Ray's socket paths: at most 107 bytes
    env = {"RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    try:
        r = subprocess.run(
            [sys.executable, "-c", PROBE, tmp],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "SEEN ['Marker']" in r.stdout, r.stdout[-2000:]


def _run_bounded(cmd: list[str], tmp: str, timeout: float) -> tuple[int, str, str, float]:
    """``cmd`` in its own session with its own Ray temp dir; the whole group (driver, local
    cluster, workers) is killed if it outlives ``timeout`` (a hang fails the test instead of
    blocking the suite). Returns (exit code, stdout, stderr, seconds)."""
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}  # fmt: skip
    start = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"still running after {timeout} s (Ray waiting for GPUs?):\n{err[-3000:]}")
    return p.returncode, out, err, time.monotonic() - start


@pytest.fixture(scope="module")
def digit_shards(digits_npz: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "digits"
    cmd = [sys.executable, "-m", "selfclust.cli", "shard", str(digits_npz), str(out)]
    subprocess.run([*cmd, "--shard-size", "400"], cwd=ROOT, check=True, capture_output=True)
    return out


@pytest.mark.slow
def test_more_gpu_workers_than_gpus_fail_at_once(digit_shards: Path, tmp_path: Path) -> None:
    """This machine's local cluster has no GPU: Ray would wait for one and retry forever."""
    tmp = tempfile.mkdtemp(prefix="sc-", dir="/tmp")  # Ray's socket paths: at most 107 bytes
    cmd = [sys.executable, "-m", "selfclust.cli", "train", "configs/quickstart.yaml",
           "--run-dir", str(tmp_path / "run"), f"data.train={digit_shards}",
           "trainer.use_gpu=true", "trainer.num_workers=1"]  # fmt: skip
    try:
        code, _, err, seconds = _run_bounded(cmd, tmp, timeout=240)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert code == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "selfclust train: error: trainer.use_gpu=true with trainer.num_workers=1 needs 1 GPU, "
        "but the local Ray cluster has 0 GPUs: set trainer.use_gpu=false, or join a cluster "
        "with enough GPUs with ray.address"
    )
    assert seconds < 120  # Ray's own wait: a timeout per minute, then retries without end


# A cluster that claims a GPU this machine lacks (Ray counts logical GPUs): the worker's
# preflight finds no CUDA and ends the run on the first attempt, Ray Train's restarts unspent.
FAKE_GPU = textwrap.dedent(
    """
    import sys
    import ray
    from selfclust.config import load_config
    from selfclust.launch import train

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
    cfg = load_config("configs/quickstart.yaml", [f"data.train={sys.argv[1]}",
                      "trainer.use_gpu=true", "trainer.num_workers=1", "wandb.mode=offline"])
    try:
        train(cfg, sys.argv[2])
    except Exception as e:
        print("ERROR", type(e).__name__, e)
    ray.shutdown()
    """
)


@pytest.mark.slow
def test_a_worker_without_cuda_fails_at_once(digit_shards: Path, tmp_path: Path) -> None:
    tmp = tempfile.mkdtemp(prefix="sc-", dir="/tmp")
    run = tmp_path / "run"
    try:
        cmd = [sys.executable, "-c", FAKE_GPU, str(digit_shards), str(run)]
        code, out, err, _ = _run_bounded(cmd, tmp, timeout=300)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert code == 0, err[-3000:]
    line = next((x for x in out.splitlines() if x.startswith("ERROR")), err[-3000:])
    assert line.startswith("ERROR GpuError trainer.use_gpu=true but CUDA is not available on "
                           "this worker"), line  # fmt: skip
    assert "or set trainer.use_gpu=false (traceback: " in line
    log = (run / "error.log").read_text()
    assert log.count("--- ") == 1 and log.count("GpuError: trainer.use_gpu=true") == 1
