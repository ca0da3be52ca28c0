"""``selfclust export`` and its loaders: the exported backbone gives the trained model's
features, plain torchvision ResNets load the state dict strictly, the file holds no path or
secret, and files that are not exports are refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50

import selfclust
from selfclust import cli
from selfclust.checkpoint import Position, make_state, write_state
from selfclust.config import RunConfig
from selfclust.eval.evaluate import load_run
from selfclust.export import ExportError, write_export
from selfclust.exported import NotAnExport, read_export
from selfclust.labels.bank import LabelBank
from selfclust.methods.registry import build_model
from selfclust.shards.write import write_shards

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def shards(digits_npz: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "digits"
    write_shards(str(digits_npz), out, shard_size=400)
    return out


def checkpoint(shards: Path, method: dict, model: dict | None = None, weights=None) -> str:
    """A real checkpoint dir of a network with random weights and non-trivial BatchNorm
    statistics (so that an export dropping buffers would be caught)."""
    cfg = RunConfig.model_validate(
        {"data": {"train": str(shards)}, "model": model or {}, "method": method}
    )
    torch.manual_seed(0)
    net = build_model(cfg, 1, 8)
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    state = make_state(
        model=net,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        bank_state=LabelBank(1, 1797, cfg.method.clusters).state_dict(),
        position=Position(epoch=3, global_step=42),
        cfg=cfg,
        wandb_id="exporttest",
        extra={"head_loss": torch.tensor([2.0, 1.0, 3.0][: getattr(cfg.method, "heads", 1)])},
    )
    if weights is not None:
        state["model"] = weights
    return write_state(state)


def batch() -> torch.Tensor:
    return torch.randint(0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(1))


SMALL = ({"heads": 3, "clusters": 10}, {"arch": "small_resnet", "widths": [8, 16]})


def test_small_resnet_export_gives_the_trained_models_features(shards: Path, tmp_path: Path):
    ckpt = checkpoint(shards, *SMALL)
    export = write_export(ckpt, tmp_path / "m.pt")
    trained, *_ = load_run(ckpt)
    x = trained_input = batch()
    model = selfclust.load_model(tmp_path / "m.pt")
    backbone = selfclust.load_backbone(tmp_path / "m.pt")
    inp = model.backbone.preprocess(x)
    with torch.no_grad():
        want = trained(trained_input.float().div(255).sub(0.5).div(0.25))
        got = model(inp)
        assert torch.equal(backbone(inp), want.features)
    assert torch.equal(got.features, want.features)
    for a, b in zip(got.logits, want.logits, strict=True):
        assert torch.equal(a, b)
    ids, probs = model.assign(inp)
    assert torch.equal(ids, torch.stack([lg.argmax(1) for lg in want.logits]))
    assert ((probs > 0) & (probs <= 1)).all()
    assert model.best_head == export["best_head"] == 1  # the lowest head_loss
    assert export["preprocess"]["image_size"] == 8 and export["preprocess"]["channels"] == 1


@pytest.mark.parametrize("arch,small_stem", [("resnet18", True), ("resnet50", False)])
def test_torchvision_resnet_loads_the_state_dict_strictly(
    shards: Path, tmp_path: Path, arch: str, small_stem: bool
):
    ckpt = checkpoint(
        shards, {"heads": 1, "clusters": 10}, {"arch": arch, "small_stem": small_stem}
    )
    write_export(ckpt, tmp_path / "m.pt")
    ex = torch.load(tmp_path / "m.pt", weights_only=True)
    # What docs/export.md tells a user to do, with torchvision alone:
    net = resnet18() if arch == "resnet18" else resnet50()
    if small_stem:
        net.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()  # type: ignore[assignment]
    else:
        net.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()  # type: ignore[assignment]
    net.load_state_dict(ex["backbone"], strict=True)
    trained, *_ = load_run(ckpt)
    x = batch().float().div(255).sub(0.5).div(0.25)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), trained(x).features)


def test_dec_export_round_trip(shards: Path, tmp_path: Path):
    ckpt = checkpoint(shards, {"name": "dec", "clusters": 10})
    write_export(ckpt, tmp_path / "dec.pt")
    trained, *_ = load_run(ckpt)
    model = selfclust.load_model(tmp_path / "dec.pt")
    x = model.backbone.preprocess(batch())
    with torch.no_grad():
        assert torch.equal(model(x).logits[0], trained(x).logits[0])


def test_export_holds_no_path_and_no_secret(shards: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-0123456789")
    ckpt = checkpoint(shards, *SMALL)
    write_export(ckpt, tmp_path / "m.pt")
    raw = (tmp_path / "m.pt").read_bytes()
    for text in (str(shards), str(Path(ckpt).parent), str(tmp_path), "secret-key", "/tmp/"):
        assert text.encode() not in raw
    ident = read_export(tmp_path / "m.pt")["identity"]
    assert ident["position"]["global_step"] == 42 and ident["wandb_id"] == "exporttest"
    assert set(ident["config"]) == {"seed", "data", "model", "method", "augment", "optim"}


def test_loading_needs_no_training_stack(shards: Path, tmp_path: Path):
    write_export(checkpoint(shards, *SMALL), tmp_path / "m.pt")
    code = (
        "import sys, torch, selfclust\n"
        f"m = selfclust.load_model({str(tmp_path / 'm.pt')!r})\n"
        "m(torch.zeros(1, 1, 8, 8))\n"
        "print(sorted(k for k in ('ray', 'wandb', 'webdataset', 'faiss') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_files_that_are_not_exports(shards: Path, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    ckpt = checkpoint(shards, *SMALL)
    cases = {
        tmp_path / "notes.txt": "torch.load failed",
        tmp_path / "other.pt": "no 'format' entry",
        Path(ckpt) / "state.pt": "is a training checkpoint",
        tmp_path / "missing.pt": "is not a file",
    }
    for path, why in cases.items():
        with pytest.raises(NotAnExport, match=why):
            selfclust.load_model(path)


def test_weights_of_another_architecture_are_refused(shards: Path):
    other = build_model(
        RunConfig.model_validate({"model": {"arch": "small_resnet", "widths": [4, 8]}}), 1, 8
    )
    ckpt = checkpoint(shards, *SMALL, weights=other.state_dict())
    with pytest.raises(ExportError, match="do not fit the network its config describes"):
        write_export(ckpt, Path(ckpt).parent / "x.pt")


def test_cli_export_and_a_bad_file(shards: Path, tmp_path: Path, capsys):
    ckpt = checkpoint(shards, *SMALL)
    assert cli.main(["export", ckpt, "--out", str(tmp_path / "m.pt")]) == 0
    assert "small_resnet backbone + 3 head(s) (best 1), step 42" in capsys.readouterr().out
    (tmp_path / "bad.pt").write_text("x")
    code = cli.main(["assign", str(tmp_path / "bad.pt"), "--data", str(shards), "--out", "a.csv"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a selfclust export" in err and "Traceback" not in err
