"""The real CLI on a small real dataset: shard → train on 2 Ray workers → summary → evaluate."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfclust.eval.evaluate import load_run
from selfclust.models.base import model_digest
from tests.helpers.cli_runs import ROOT, STEPS, train_cmd


def selfclust(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "RAY_DEDUP_LOGS": "0"}
    return subprocess.run(
        [sys.executable, "-m", "selfclust.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def shards(digits_npz: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "digits"
    r = selfclust("shard", str(digits_npz), str(out), "--shard-size", "400")
    assert r.returncode == 0, r.stderr
    assert "1797 samples in 5 shards" in r.stdout
    return out


@pytest.mark.slow
def test_train_evaluate_resume(
    digits_shards: Path, reference_run: tuple[Path, dict], tmp_path: Path
) -> None:
    """`selfclust train` (the session's reference run, tests/helpers/cli_runs.py) → summary,
    metrics, W&B; then `evaluate`, a rerun that resumes with nothing left to train, a refused
    config."""
    run, summary = reference_run
    args = train_cmd(digits_shards, run)[3:]  # from "train" on
    printed = (run.parent / "log.txt").read_text()
    assert "ACC" in printed and "NMI" in printed
    assert_quiet_console(printed, run)

    assert summary["steps"] == STEPS and summary["epochs"] == 8
    assert len(summary["heads"]) == 2 and summary["num_samples"] == 1797
    for key in ("acc", "nmi", "ari"):
        # ACC and NMI lie in [0, 1], ARI in [-1, 1] with 0 for chance: a trained run is above it
        assert (0 < summary[key] <= 1) if key == "ari" else (0 <= summary[key] <= 1), key
        assert summary[key] == summary["heads"][summary["best_head"]][key]
    assert len(summary["model_digest"]) == 64
    # the digest is the final checkpoint's model's, recomputed here from its saved state
    model, _, ckpt, _ = load_run(run)
    assert ckpt.resolve() == Path(summary["checkpoint"]).resolve()
    assert model_digest(model) == summary["model_digest"]
    assert (Path(summary["checkpoint"]) / "state.pt").is_file()

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in x and "epoch" in x for x in lines)
    train_lines = [x for x in lines if "loss" in x]
    assert train_lines and all(x["images_per_s"] > 0 and x["lr"] > 0 for x in train_lines)
    relabels = [x for x in lines if x.get("event") == "relabel"]
    assert len(relabels) >= 2
    for x in relabels:
        assert x["samples_seen"] == 1797 and x["sinkhorn_iters"] >= 1
        assert x["cluster_size_min"] <= x["cluster_size_max"]
    assert list(run.glob("wandb/offline-run-*")), "W&B offline run missing"
    assert json.loads((run / "run.json").read_text())["wandb_id"]

    # evaluate the final checkpoint: same model, same data → the same per-head scores
    out = tmp_path / "eval.json"
    r = selfclust("evaluate", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads(out.read_text())
    for a, b in zip(ev["heads"], summary["heads"], strict=True):
        assert a["acc"] == pytest.approx(b["acc"]) and a["nmi"] == pytest.approx(b["nmi"])
        assert a["ari"] == pytest.approx(b["ari"])
    assert ev["ari"] == pytest.approx(summary["ari"]) and ev["best_head"] == summary["best_head"]

    # the same command again resumes from the final checkpoint: nothing more to train
    r = selfclust(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((run / "summary.json").read_text())
    assert again["steps"] == summary["steps"]
    assert again["model_digest"] == summary["model_digest"]

    # the run dir belongs to this config: another lr is refused, naming the key
    r = selfclust(*args, "optim.lr=0.2")
    assert r.returncode == 2
    assert "optim.lr" in r.stderr and "another config" in r.stderr


def assert_quiet_console(printed: str, run: Path) -> None:
    """A default run's terminal (not a TTY here): occasional progress lines, a line per label
    update, the results table; none of Ray's lines, which are in RUN_DIR/ray.log."""
    lines = printed.splitlines()
    steps = [x for x in lines if x.startswith("[selfclust] step ")]
    # every trainer.log_every=5 steps an event, a line at each tenth of the 224 steps
    assert 8 <= len(steps) <= 12 and all(" img/s ETA " in x for x in steps), steps
    assert "\r" not in printed
    assert any(x.startswith("[selfclust] first labels (kmeans_pixels) at step 0") for x in lines)
    update = next(x for x in lines if x.startswith("[selfclust] labels at step 52 "))
    assert re.search(r": \d+\.\d s, Sinkhorn \d+ iterations, clusters of \d+-\d+ samples$", update)
    assert any(x.startswith("head       acc       nmi") for x in lines)
    for ray_line in (" INFO ", "WARNING", "core_worker.cc", "Token authentication", "pid=",
                     "Started a local Ray instance"):  # fmt: skip
        assert ray_line not in printed, ray_line
    log = (run / "ray.log").read_text()
    assert "core_worker.cc" in log and "Started a local Ray instance" in log
    assert "(TrainController pid=" in log and "(RayTrainWorker pid=" in log


@pytest.mark.slow
def test_console_verbose_and_token_auth(shards: Path, tmp_path: Path) -> None:
    """Token authentication stays on for the local cluster selfclust starts, and its notice
    goes to RUN_DIR/ray.log, not the terminal; ``--verbose`` shows Ray's output as before."""
    quick = ("optim.epochs=1", "method.relabels=2")
    home = tmp_path / "home"  # Ray keeps the token it generates in ~/.ray/auth_token
    env = {**os.environ, "WANDB_MODE": "offline", "HOME": str(home)}
    env.pop("RAY_AUTH_MODE", None)
    run = tmp_path / "quiet"
    r = subprocess.run(train_cmd(shards, run, *quick), capture_output=True, text=True,
                       timeout=600, env=env, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Token authentication" not in r.stdout + r.stderr
    assert "core_worker.cc" not in r.stdout + r.stderr and "pid=" not in r.stdout + r.stderr
    assert "Token authentication is enabled for this Ray cluster" in (run / "ray.log").read_text()
    assert (home / ".ray" / "auth_token").is_file()  # the cluster ran with token auth

    run = tmp_path / "verbose"
    r = selfclust(*train_cmd(shards, run, *quick, "--verbose")[3:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Started a local Ray instance" in r.stderr and "(TrainController pid=" in r.stderr
    assert "(RayTrainWorker pid=" in r.stderr and "selfclust:progress" not in r.stderr
    steps = [x for x in r.stderr.splitlines() if x.startswith("[selfclust] step ")]
    assert len(steps) == 28 // 5  # a line per event, as before
    assert "[selfclust] labels at step " in r.stderr and "ACC" in r.stdout
    assert "Started a local Ray instance" in (run / "ray.log").read_text()


@pytest.mark.slow
def test_bad_inputs_fail_fast_with_clear_errors(shards: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = selfclust(
        "train", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "a"), f"data.train={empty}"
    )
    assert r.returncode == 2 and "manifest" in r.stderr

    r = selfclust(
        "train",
        "configs/quickstart.yaml",
        "--run-dir",
        str(tmp_path / "b"),
        f"data.train={shards}",
        "method.clusters=5000",
    )
    assert r.returncode == 2 and "method.clusters=5000" in r.stderr

    r = selfclust("train", "configs/quickstart.yaml", "optim.lrr=1")
    assert r.returncode == 2 and "optim.lrr" in r.stderr

    r = selfclust("shard", str(tmp_path / "missing.npz"), str(tmp_path / "out"))
    assert r.returncode == 2 and "missing.npz" in r.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()

    # A shard removed, another cut short: one line naming both, before any Ray worker starts.
    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    (damaged / "shard-000001.tar").unlink()
    tar = damaged / "shard-000003.tar"
    tar.write_bytes(tar.read_bytes()[:4096])
    for cmd in (["shard", "--verify", "--quick", str(damaged)],
                ["train", "configs/quickstart.yaml", "--run-dir", str(tmp_path / "c"),
                 f"data.train={damaged}"]):  # fmt: skip
        r = selfclust(*cmd, timeout=30)
        line = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and line.startswith(f"selfclust {cmd[0]}: error: 2 of the 5")
        assert "shard-000001.tar is missing" in line and "shard-000003.tar is 4096 bytes" in line
        assert "Ray" not in r.stdout + r.stderr  # no cluster was started
    assert not (tmp_path / "c" / "ray").exists()


@pytest.mark.slow
def test_a_user_error_in_a_worker_ends_the_run_at_once(shards: Path, tmp_path: Path) -> None:
    """A loss that diverges at these settings diverges again after every restart: the run
    stops on the first attempt (Ray Train's failure budget is for faults), says what to
    change in one line, and keeps each rank's traceback in RUN_DIR/error.log."""
    run = tmp_path / "run"
    cmd = train_cmd(shards, run, "optim.lr=1e9", "trainer.log_every=1", "method.init=random")
    r = subprocess.run(cmd[:1] + cmd[1:], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "WANDB_MODE": "offline"})  # fmt: skip
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(x for x in r.stderr.splitlines() if x.startswith("selfclust train: error:"))
    assert "loss became non-finite" in line and "optim.lr" in line and "error.log" in line
    assert "Traceback" not in r.stdout + r.stderr  # Ray Train's own copies are filtered
    log = (run / "error.log").read_text()
    # one attempt: each of the 2 ranks logged its error once (FAULT_RUN allows 2 restarts)
    assert sorted(x.split()[-1] for x in log.splitlines() if x.startswith("--- ")) == ["0", "1"]
    assert log.count("NonFiniteLoss: loss became non-finite") == 2
