"""The worker loop on 2 gloo ranks, without Ray: identical ranks, exact mid-epoch resume, resume
right after a label update, elastic resume on 1 rank; the bf16 and loader-augment paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from selfclust.shards.write import write_shards

OVERRIDES = [
    "model.arch=small_resnet",
    "model.widths=[8,16]",
    "method.heads=2",
    "method.clusters=10",
    "method.init=kmeans_pixels",
    "method.relabels=3",
    "optim.epochs=2",
    "optim.batch_size=64",
    "checkpoint.every_steps=9",
    "trainer.log_every=5",
    "wandb.mode=disabled",
]


def run_rank(
    rank: int, world: int, shards: str, out: str, resume_from: str | None, *extra: str
) -> dict:
    from tests.helpers.spawn import train_rank

    return train_rank(rank, world, shards, out, [*OVERRIDES, *extra], resume_from)


@pytest.fixture(scope="module")
def shards(digits_npz: Path, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits") / "shards"
    write_shards(digits_npz, out, shard_size=250)
    return str(out)


STEPS = 2 * (1797 // 64)


def run_several(rank: int, world: int, shards: str, out: str, runs: dict) -> dict:
    """Several runs one after the other in the same rank processes (one spawn):
    ``runs[name] = (resume_from, extra overrides)``."""
    return {
        name: run_rank(rank, world, shards, f"{out}/{name}", resume, *extra)
        for name, (resume, extra) in runs.items()
    }


def relabel_steps(run: Path) -> list[int]:
    lines = (run / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if '"event": "relabel"' in x]


def losses(run: Path) -> list[float]:
    lines = (run / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


@pytest.fixture(scope="module")
def full(shards: str, tmp_path_factory) -> tuple[Path, list[dict]]:
    """One uninterrupted 2-rank run: its output dir and both ranks' results."""
    from tests.helpers.spawn import run_ranks

    out = tmp_path_factory.mktemp("full")
    return out, run_ranks(run_rank, 2, out / "spawn", shards, str(out), None)


@pytest.fixture(scope="module")
def mid(full: tuple[Path, list[dict]]) -> str:
    """A mid-epoch checkpoint of the second epoch of the full run."""
    saved = full[1][0]["saved"]
    found = [p for m, p in saved if m["kind"] == "step" and m["epoch"] == 1 and m["step_in_epoch"]]
    assert found, [m["kind"] for m, _ in saved]
    return found[0]


@pytest.fixture(scope="module")
def after_labels(full: tuple[Path, list[dict]]) -> tuple[int, str]:
    """The step and checkpoint right after the first mid-run label update."""
    saved = full[1][0]["saved"]
    labels = [(m, p) for m, p in saved if m["kind"] == "labels" and m["global_step"] > 0]
    assert labels, [m["kind"] for m, _ in saved]
    return labels[0][0]["global_step"], labels[0][1]


@pytest.fixture(scope="module")
def resumed(
    shards: str, mid: str, after_labels: tuple[int, str], tmp_path_factory
) -> tuple[Path, list[dict]]:
    """Both 2-rank resumes of the full run (from ``mid``, from ``after_labels``), one spawn."""
    from tests.helpers.spawn import run_ranks

    out = tmp_path_factory.mktemp("resumed")
    runs = {"mid": (mid, ()), "labels": (after_labels[1], ())}
    return out, run_ranks(run_several, 2, out / "spawn", shards, str(out), runs)


def test_two_ranks_agree(full: tuple[Path, list[dict]]) -> None:
    out, results = full
    s0, s1 = results[0]["summary"], results[1]["summary"]
    assert s0["model_digest"] == s1["model_digest"]  # one model on every rank
    assert s0["heads"] == s1["heads"]
    assert s0["steps"] == STEPS and s0["epochs"] == 2
    kinds = [m["kind"] for m, _ in results[0]["saved"]]
    assert kinds.count("epoch") == 2 and kinds[-1] == "final" and "step" in kinds
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    assert any('"event": "init_kmeans_pixels"' in x for x in lines)


def test_mid_epoch_resume_is_exact(full: tuple[Path, list[dict]], resumed) -> None:
    """Resumed from a mid-epoch checkpoint of the second epoch: same final model, bit for bit."""
    s0, got = full[1][0]["summary"], resumed[1][0]["mid"]["summary"]
    assert got["steps"] == STEPS
    assert got["model_digest"] == s0["model_digest"]
    assert got["heads"] == s0["heads"]


def test_resume_after_label_update_does_not_redo_it(
    full: tuple[Path, list[dict]], after_labels: tuple[int, str], resumed
) -> None:
    """Resumed right after a mid-run label update: the update is not redone, the result equal."""
    s0, got = full[1][0]["summary"], resumed[1][0]["labels"]["summary"]
    assert got["model_digest"] == s0["model_digest"]
    at = after_labels[0]
    assert relabel_steps(resumed[0] / "labels") == [s for s in relabel_steps(full[0]) if s > at]


def test_elastic_resume_on_one_worker(shards: str, mid: str, tmp_path: Path) -> None:
    """The 2-worker mid-epoch checkpoint continues on 1 worker to the same step count."""
    from tests.helpers.spawn import run_ranks

    one = run_ranks(run_rank, 1, tmp_path / "spawn", shards, str(tmp_path), mid)
    assert one[0]["summary"]["steps"] == STEPS and one[0]["summary"]["epochs"] == 2
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"event": "resumed_elastic"' in log and '"from_workers": 2' in log


@pytest.fixture(scope="module")
def one_rank_paths(shards: str, tmp_path_factory) -> tuple[Path, dict]:
    """bf16 autocast and loader-side augmentation, one run each, in one 1-rank spawn."""
    from tests.helpers.spawn import run_ranks

    out = tmp_path_factory.mktemp("paths")
    runs = {
        "bf16": (None, ("trainer.precision=bf16",)),
        "loader": (None, ("augment.where=loader",)),
    }
    return out, run_ranks(run_several, 1, out / "spawn", shards, str(out), runs)[0]


def test_bf16_autocast_path_trains(one_rank_paths: tuple[Path, dict]) -> None:
    """The GPU path's bf16 autocast also runs on CPU (precision=bf16): CI exercises its code."""
    out, results = one_rank_paths
    assert results["bf16"]["summary"]["steps"] == STEPS
    got = losses(out / "bf16")
    assert got and all(isinstance(v, float) and math.isfinite(v) for v in got)
    # below the loss of a uniform prediction, ln K: it fits its pseudo-labels
    assert sum(got[-3:]) / 3 < math.log(10)


def test_loader_augment_path_trains(one_rank_paths: tuple[Path, dict]) -> None:
    """augment.where=loader: loader workers crop and jitter, the step only standardises; the
    run trains like the device path."""
    out, results = one_rank_paths
    assert results["loader"]["summary"]["steps"] == STEPS
    got = losses(out / "loader")
    assert got and all(isinstance(v, float) and math.isfinite(v) for v in got)
    assert sum(got[-3:]) / 3 < math.log(10)
