"""Run pictures on real shards: valid PNGs, one gallery tile row per cluster shown, the most
confident images chosen, W&B offline logging into the run's own run; and the probe CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from selfclust import cli
from selfclust.checkpoint import Position, make_state, write_state
from selfclust.config import RunConfig
from selfclust.data.shardset import ShardSet
from selfclust.eval.pictures import Assignments, assign, chosen_tiles, draw, log_to_wandb
from selfclust.labels.bank import LabelBank
from selfclust.models.selflabel import SelfLabelNet
from selfclust.shards.write import write_shards


@pytest.fixture(scope="module")
def shards(digits_npz: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pictures") / "digits"
    write_shards(str(digits_npz), out, shard_size=600)
    return out


def _cfg(shards: Path) -> RunConfig:
    return RunConfig.model_validate(
        {
            "data": {"train": str(shards)},
            "model": {"arch": "small_resnet", "widths": [8, 16]},
            "method": {"heads": 2, "clusters": 6},
            "wandb": {"mode": "offline"},
        }
    )


def _model(cfg: RunConfig) -> SelfLabelNet:
    torch.manual_seed(0)
    return SelfLabelNet(cfg.model, 1, cfg.method.heads, cfg.method.clusters)


def tile_rows(png: Path, per_cluster: int) -> int:
    """Count the image rows crossed by a vertical strip through the first tile column: tiles
    have a black background, the gaps between rows are the white figure background."""
    im = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    width = im.shape[1] * 0.98  # subplots_adjust(left=0.01, right=0.99)
    x = int(im.shape[1] * 0.01 + width * (2.6 + 0.5) / (2.6 + per_cluster))
    dark = np.concatenate([[False], im[:, x - 15 : x + 16].mean(1) < 245, [False]])
    starts = np.flatnonzero(dark[1:] & ~dark[:-1])
    ends = np.flatnonzero(~dark[1:] & dark[:-1])
    return int(np.sum(ends - starts >= 20))  # a tile is ~70 px tall; title text is ~12 px


def test_most_confident_first():
    a = Assignments(
        idx=np.array([10, 11, 12, 13, 14]),
        cls=np.zeros(5, dtype=np.int64),
        pred=np.array([0, 1, 0, 0, 1]),
        conf=np.array([0.5, 0.9, 0.8, 0.7, 0.95]),
        total=5,
    )
    tiles = chosen_tiles(a, [1, 0], 2)
    assert list(tiles) == [1, 0]
    assert tiles[1].tolist() == [14, 11] and tiles[0].tolist() == [12, 13]


def test_pictures_on_real_shards(shards: Path, tmp_path: Path):
    cfg = _cfg(shards)
    s = ShardSet.open(shards)
    a = assign(_model(cfg), s, head=1, image_size=None, max_samples=1000, batch_size=256)
    assert len(a.idx) == 1000 and a.total == 1797 and (a.conf <= 1).all()
    # a controlled partition of real images: 6 clusters of the true classes 0..5
    a.pred = np.where(a.cls < 6, a.cls, 0)
    paths = draw(a, s, tmp_path, 6, image_size=None, head=1, per_cluster=8)
    assert sorted(paths) == ["cluster_sizes", "confusion", "gallery"]
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(p) as im:
            im.verify()
    assert tile_rows(paths["gallery"], 8) == 6
    paths = draw(
        a, s, tmp_path / "three", 6, image_size=None, head=1, per_cluster=8, max_clusters=3
    )
    assert tile_rows(paths["gallery"], 8) == 3
    a.cls[:] = -1  # no ground truth: no confusion matrix, gallery still drawn
    paths = draw(a, s, tmp_path / "unlabelled", 6, image_size=None, head=1, per_cluster=5)
    assert "confusion" not in paths and tile_rows(paths["gallery"], 5) == 6


def test_wandb_offline_resumes_the_runs_id(shards: Path, tmp_path: Path):
    cfg = _cfg(shards)
    (tmp_path / "run.json").write_text(json.dumps({"name": "x", "wandb_id": "scpictest"}))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    png = tmp_path / "one.png"
    Image.new("L", (8, 8)).save(png)
    note = log_to_wandb(tmp_path, {"gallery": png}, step=7)
    assert "scpictest" in note and "offline" in note
    runs = list((tmp_path / "wandb").glob("offline-run-*-scpictest"))
    assert runs and list(runs[0].rglob("media/images/**/*.png"))
    disabled = cfg.model_copy(update={"wandb": cfg.wandb.model_copy(update={"mode": "disabled"})})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(disabled.to_dict()))
    assert "disabled" in log_to_wandb(tmp_path, {"gallery": png}, step=7)


def test_probe_and_evaluate_cli_on_a_checkpoint(shards: Path, tmp_path: Path, monkeypatch):
    cfg = _cfg(shards)
    model = _model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    bank = LabelBank(2, 1797, 6)
    state = make_state(
        model=model,
        optimizer=opt,
        scheduler=sched,
        bank_state=bank.state_dict(),
        position=Position(),
        cfg=cfg,
        wandb_id="sctest",
        extra={"head_loss": torch.tensor([2.0, 1.0])},
    )
    ckpt = write_state(state)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "p.json"
    args = ["probe", ckpt, "--data", str(shards), "--epochs", "2", "--views", "1"]
    assert cli.main([*args, "--knn-k", "5", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["linear"]) == {"stem", "stage1", "pool"} and set(r["knn"]) == {"k5"}
    assert r["num_train"] + r["num_eval"] == 1797 and "stratified" in r["split"]
    assert r["protocol"]["epochs"] == 2 and r["protocol"]["hflip"] == cfg.augment.hflip
    assert cli.main(["evaluate", ckpt]) == 0
    ev = json.loads((tmp_path / "evaluation.json").read_text())
    assert ev["best_head"] == 1 and ev["k_equals_classes"] is False  # K = 6, 10 classes
    assert len(ev["head_agreement"]["pairs"]) == 1
    assert {"ami", "majority_acc", "size_entropy"} <= set(ev["heads"][0])
    assert cli.main(["evaluate", ckpt, "--pictures"]) == 2  # pictures need a run dir


def test_picture_samples_bound_the_pass_by_pixels() -> None:
    from selfclust.eval.pictures import picture_samples

    assert picture_samples(None) == picture_samples(28) == picture_samples(32) == 100_000
    assert picture_samples(64) == 25_000  # as many pixels as 100,000 images of 32 px
    assert picture_samples(224) == picture_samples(512) == 10_000  # never below 10,000
