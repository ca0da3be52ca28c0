"""The worker loop on 2 gloo ranks, without Ray: identical ranks and exact mid-epoch resume."""

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


def test_two_ranks_agree_and_resume_exactly(shards: str, tmp_path: Path) -> None:
    from tests.helpers.spawn import run_ranks

    full = run_ranks(run_rank, 2, tmp_path / "full", shards, str(tmp_path / "full"), None)
    s0, s1 = full[0]["summary"], full[1]["summary"]
    assert s0["model_digest"] == s1["model_digest"]  # one model on every rank
    assert s0["heads"] == s1["heads"]
    steps = 2 * (1797 // 64)
    assert s0["steps"] == steps and s0["epochs"] == 2

    saved = full[0]["saved"]
    kinds = [m["kind"] for m, _ in saved]
    assert kinds.count("epoch") == 2 and kinds[-1] == "final" and "step" in kinds
    # resume from a mid-epoch checkpoint of the second epoch: same final model, bit for bit
    mid = [p for m, p in saved if m["kind"] == "step" and m["epoch"] == 1 and m["step_in_epoch"]]
    assert mid, kinds
    resumed = run_ranks(
        run_rank, 2, tmp_path / "resumed", shards, str(tmp_path / "resumed"), mid[0]
    )
    assert resumed[0]["summary"]["steps"] == steps
    assert resumed[0]["summary"]["model_digest"] == s0["model_digest"]
    assert resumed[0]["summary"]["heads"] == s0["heads"]

    # resume right after a mid-run label update: the update is not redone, the result is equal
    labels = [(m, p) for m, p in saved if m["kind"] == "labels" and m["global_step"] > 0]
    assert labels, kinds
    at = labels[0][0]["global_step"]
    again = run_ranks(
        run_rank, 2, tmp_path / "labels", shards, str(tmp_path / "labels"), labels[0][1]
    )
    assert again[0]["summary"]["model_digest"] == s0["model_digest"]

    def relabel_steps(run: str) -> list[int]:
        lines = (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["step"] for x in lines if '"event": "relabel"' in x]

    assert relabel_steps("labels") == [s for s in relabel_steps("full") if s > at]

    # elastic: the 2-worker mid-epoch checkpoint continues on 1 worker to the same step count
    one = run_ranks(run_rank, 1, tmp_path / "elastic", shards, str(tmp_path / "elastic"), mid[0])
    assert one[0]["summary"]["steps"] == steps and one[0]["summary"]["epochs"] == 2
    log = (tmp_path / "elastic" / "run" / "metrics.jsonl").read_text()
    assert '"event": "resumed_elastic"' in log and '"from_workers": 2' in log

    lines = (tmp_path / "full" / "run" / "metrics.jsonl").read_text().splitlines()
    assert any('"event": "init_kmeans_pixels"' in x for x in lines)


def test_bf16_autocast_path_trains(shards: str, tmp_path: Path) -> None:
    """The GPU path's bf16 autocast also runs on CPU (precision=bf16): CI exercises its code."""
    from tests.helpers.spawn import run_ranks

    out = run_ranks(run_rank_bf16, 1, tmp_path, shards, str(tmp_path))
    summary = out[0]["summary"]
    assert summary["steps"] == 2 * (1797 // 64)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(x)["loss"] for x in lines if '"loss"' in x]
    assert losses and all(isinstance(v, float) and v == v for v in losses)  # finite, not NaN
    # below the loss of a uniform prediction, ln K: it fits its pseudo-labels
    assert sum(losses[-3:]) / 3 < math.log(10)


def run_rank_bf16(rank: int, world: int, shards: str, out: str) -> dict:
    return run_rank(rank, world, shards, out, None, "trainer.precision=bf16")


def test_loader_augment_path_trains(shards: str, tmp_path: Path) -> None:
    """augment.where=loader: loader workers crop and jitter, the step only standardises; the
    run trains like the device path."""
    from tests.helpers.spawn import run_ranks

    out = run_ranks(run_rank_loader, 1, tmp_path, shards, str(tmp_path))
    assert out[0]["summary"]["steps"] == 2 * (1797 // 64)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(x)["loss"] for x in lines if '"loss"' in x]
    assert losses and all(isinstance(v, float) and v == v for v in losses)
    assert sum(losses[-3:]) / 3 < math.log(10)


def run_rank_loader(rank: int, world: int, shards: str, out: str) -> dict:
    return run_rank(rank, world, shards, out, None, "augment.where=loader")
