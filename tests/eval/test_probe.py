"""Linear probes: per-stage features, learning a separable set, not learning shuffled labels,
and the same result on 2 gloo ranks as on one (features extracted per rank from real shards);
``--workers auto`` following the run's config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from selfclust import cli
from selfclust import collectives as C
from selfclust.checkpoint import Position, make_state, write_state
from selfclust.config import AugmentConfig, ModelConfig, RunConfig, load_config
from selfclust.data.shardset import ShardSet
from selfclust.eval.features import Features, extract
from selfclust.eval.probe import ProbeConfig
from selfclust.eval.probe_launch import AUTO_MIN_SAMPLES, resolve_workers, run_probe
from selfclust.eval.probe_protocol import probe_features, probe_model
from selfclust.labels.bank import LabelBank
from selfclust.models.selflabel import SelfLabelNet
from selfclust.shards.write import write_shards
from tests.helpers.spawn import run_ranks

ROOT = Path(__file__).parents[2]  # the repository
FAST: dict[str, Any] = dict(epochs=15, batch_size=128, views=1, knn_k=(20,))


def synthetic(seed: int, n: int, classes: int = 10, d: int = 24, shuffle: bool = False):
    """Well separated Gaussian blobs (linearly separable in practice); features as one
    ``pool`` stage plus a pure-noise ``noise`` stage."""
    rng = np.random.default_rng(seed)
    centers = 6 * np.eye(classes, d)
    y = rng.integers(0, classes, n)
    x = centers[y] + rng.normal(size=(n, d))
    if shuffle:
        y = rng.permutation(y)
    stages = {
        "noise": torch.from_numpy(rng.normal(size=(1, n, 8))).float(),
        "pool": torch.from_numpy(x[None]).float(),
    }
    return Features(stages, torch.arange(n) + seed * n, torch.from_numpy(y))


def test_stage_features_end_in_the_pool():
    x = torch.randn(2, 1, 16, 16)
    small = SelfLabelNet(ModelConfig(arch="small_resnet", widths=[4, 8, 16]), 1, 1, 3).eval()
    f = small.stage_features(x)
    assert list(f) == ["stem", "stage1", "stage2", "pool"]
    assert [t.shape[1] for t in f.values()] == [4, 4, 8, 16]
    torch.testing.assert_close(f["pool"], small.backbone(x))
    r18 = SelfLabelNet(ModelConfig(arch="resnet18"), 1, 1, 3).eval()
    f = r18.stage_features(x)
    assert list(f) == ["conv1", "layer1", "layer2", "layer3", "pool"]
    assert [t.shape[1] for t in f.values()] == [64, 64, 128, 256, 512]
    torch.testing.assert_close(f["pool"], r18.backbone(x))


def test_learns_separable_set():
    cfg = ProbeConfig(**FAST)
    r = probe_features(synthetic(0, 2000), synthetic(1, 500), 10, cfg, group=None)
    assert r["linear"]["pool"]["top1"] >= 0.99
    assert r["linear"]["noise"]["top1"] < 0.2  # noise features carry no class information
    assert r["knn"]["k20"]["top1"] >= 0.99
    assert r["num_train"] == 2000 and r["num_eval"] == 500


def test_shuffled_labels_stay_at_chance():
    cfg = ProbeConfig(**FAST)
    r = probe_features(synthetic(0, 2000, shuffle=True), synthetic(1, 1000), 10, cfg, group=None)
    assert abs(r["linear"]["pool"]["top1"] - 0.1) < 0.05
    assert abs(r["knn"]["k20"]["top1"] - 0.1) < 0.05


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        ProbeConfig(schedule="linear")


@pytest.fixture(scope="module")
def digit_shards(digits_npz: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "digits"
    write_shards(str(digits_npz), out, shard_size=400)
    return out


def _model() -> SelfLabelNet:
    torch.manual_seed(0)
    return SelfLabelNet(ModelConfig(arch="small_resnet", widths=[8, 16]), 1, 1, 10)


def _probe(rank: int, world: int, shards: str, eval_shards: str | None):
    torch.set_num_threads(1)
    cfg = ProbeConfig(epochs=4, batch_size=128, views=2, knn_k=(20, 200))
    ev = ShardSet.open(eval_shards) if eval_shards else None
    return probe_model(
        _model(), ShardSet.open(shards), ev, cfg, image_size=None, batch_size=200, group=C.WORLD
    )


def _extract(shards: str):
    aug = AugmentConfig(crop_scale=(0.6, 1.0), rotation=0, hflip=0, jitter_p=0, grayscale=0)
    f = extract(
        _model(), ShardSet.open(shards), views=2, aug=aug, seed=0, image_size=None, group=C.WORLD
    )
    return f.idx, f.stages["stage1"], f.stages["pool"]


def _synthetic(world: int, rank: int):
    train, test = synthetic(0, 2000), synthetic(1, 500)
    mine = torch.arange(2000) % world == rank  # interleaved rows: the global order matters
    mine_q = torch.arange(500) % world == rank
    group = None if world == 1 else C.WORLD
    return probe_features(train.rows(mine), test.rows(mine_q), 10, ProbeConfig(**FAST), group)


def _everything(rank: int, world: int, shards: str):
    """One spawn of 2 ranks for all the distributed checks (process start-up is the cost)."""
    torch.set_num_threads(1)
    return {
        "probe": _probe(rank, world, shards, None),
        "features": _extract(shards),
        "synthetic": _synthetic(world, rank),
    }


@pytest.fixture(scope="module")
def two_ranks(digit_shards: Path, tmp_path_factory) -> list[dict]:
    return run_ranks(_everything, 2, tmp_path_factory.mktemp("ranks"), str(digit_shards))


def test_real_shards_two_ranks_equal_one(digit_shards: Path, two_ranks: list[dict]):
    one = _probe(0, 1, str(digit_shards), None)
    assert "stratified split" in one["split"]
    assert one["num_train"] + one["num_eval"] == 1797 and one["num_eval"] == 360
    assert list(one["linear"]) == ["stem", "stage1", "pool"]
    # random conv features of 8x8 digits are already far better than chance (0.1)
    assert one["linear"]["pool"]["top1"] > 0.3 and one["knn"]["k20"]["top1"] > 0.3
    for r in (t["probe"] for t in two_ranks):
        assert r["num_train"] == one["num_train"] and r["split"] == one["split"]
        # Ranks embed different batches, so features differ by ~1e-7 (checked below); a
        # random net's features are nearly parallel (cosine ~0.99), so near-ties at the k-th
        # neighbour may flip for a few samples. Exact k-NN equality: the synthetic test.
        for k, s in one["knn"].items():
            assert r["knn"][k]["top1"] == pytest.approx(s["top1"], abs=10 / 360)
        for stage, s in one["linear"].items():
            assert r["linear"][stage]["top1"] == pytest.approx(s["top1"], abs=1 / 360 + 1e-9)
            assert r["linear"][stage]["top5"] == pytest.approx(s["top5"], abs=1 / 360 + 1e-9)


def test_features_extracted_per_rank(digit_shards: Path, two_ranks: list[dict]):
    one = _extract(str(digit_shards))
    parts = [t["features"] for t in two_ranks]
    assert all(len(p[0]) > 0 for p in parts) and sum(len(p[0]) for p in parts) == 1797
    idx = torch.cat([p[0] for p in parts])
    assert torch.equal(torch.sort(idx).values, torch.arange(1797))
    for stage in (1, 2):  # both views (clean and crop) of every sample, on either rank count
        got = torch.cat([p[stage] for p in parts], 1)[:, torch.argsort(idx)]
        want = one[stage][:, torch.argsort(one[0])]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_synthetic_two_ranks_equal_one(two_ranks: list[dict]):
    one = _synthetic(1, 0)
    for r in (t["synthetic"] for t in two_ranks):
        assert r["knn"] == one["knn"] and r["num_train"] == 2000
        for stage, s in one["linear"].items():
            assert r["linear"][stage]["top1"] == pytest.approx(s["top1"], abs=1 / 500 + 1e-9)


def test_separate_eval_shards(digit_shards: Path):
    r = _probe(0, 1, str(digit_shards), str(digit_shards))
    assert r["num_train"] == r["num_eval"] == 1797 and "evaluation:" in r["split"]


def test_auto_workers_follow_the_run():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["trainer.num_workers=4"])
    big = AUTO_MIN_SAMPLES + 1
    assert resolve_workers("auto", cfg, 1797, 5, gpus=0)[0] == 1
    assert resolve_workers("auto", cfg, AUTO_MIN_SAMPLES, 50, gpus=0)[0] == 1
    world, rule = resolve_workers("auto", cfg, big, 50, gpus=0)
    assert world == 4 and "trainer.num_workers=4" in rule and "capped" not in rule
    world, rule = resolve_workers("auto", cfg, big, 3, gpus=0)  # 3 shards: a 4th rank idles
    assert world == 3 and "capped at 3 training shards" in rule
    assert resolve_workers("auto", cfg, big, 50, gpus=2)[0] == 2  # one rank per GPU
    assert resolve_workers(3, cfg, 10, 1, gpus=0) == (3, "--workers 3")  # explicit: as given
    with pytest.raises(ValueError, match="one GPU per rank"):
        resolve_workers(3, cfg, 10, 1, gpus=2)
    for bad in (0, "three"):
        with pytest.raises(ValueError, match="'auto' or a count"):
            resolve_workers(bad, cfg, 10, 1, gpus=0)


def test_cli_workers_option(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["probe", "run"]).workers == "auto"
    assert parser.parse_args(["probe", "run", "--workers", "2"]).workers == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["probe", "run", "--workers", "0"])
    assert "'auto' or a count >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["probe", "--help"])
    assert f"{AUTO_MIN_SAMPLES:,} samples" in capsys.readouterr().out  # the help states the rule


@pytest.fixture(scope="module")
def checkpoint(digit_shards: Path) -> str:
    """A real checkpoint dir of a run whose config asks for 2 trainer workers."""
    cfg = RunConfig.model_validate(
        {
            "data": {"train": str(digit_shards)},
            "model": {"arch": "small_resnet", "widths": [8, 16]},
            "method": {"heads": 1, "clusters": 10},
            "trainer": {"num_workers": 2},
        }
    )
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = make_state(
        model=model,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        bank_state=LabelBank(1, 1797, 10).state_dict(),
        position=Position(),
        cfg=cfg,
        wandb_id="probetest",
    )
    return write_state(state)


def test_run_probe_auto_is_one_process_and_two_spawned_ranks_agree(checkpoint: str):
    cfg = ProbeConfig(epochs=2, views=1, knn_k=(20,))
    one = run_probe(checkpoint, None, None, cfg)  # auto: 1,797 samples -> in this process
    assert one["world_size"] == 1 and one["device"] == "cpu"
    assert one["workers"] == {
        "requested": "auto",
        "ranks": 1,
        "rule": f"auto: 1,797 samples <= {AUTO_MIN_SAMPLES:,}, one process",
    }
    assert one["num_train"] + one["num_eval"] == 1797 and one["linear"]["pool"]["top1"] > 0.3
    two = run_probe(checkpoint, None, None, cfg, workers=2)  # spawned gloo ranks
    assert two["world_size"] == 2 and two["workers"]["rule"] == "--workers 2"
    assert two["split"] == one["split"] and two["num_eval"] == one["num_eval"] == 360
    for stage, s in one["linear"].items():  # tolerances as in test_real_shards_two_ranks_equal_one
        assert two["linear"][stage]["top1"] == pytest.approx(s["top1"], abs=1 / 360 + 1e-9)
    assert two["knn"]["k20"]["top1"] == pytest.approx(one["knn"]["k20"]["top1"], abs=10 / 360)
