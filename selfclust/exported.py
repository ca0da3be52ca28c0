"""An export file read back: :func:`load_backbone` and :func:`load_model` (also as
``selfclust.load_backbone`` / ``selfclust.load_model``) rebuild the exported networks in eval
mode from ``torch.load(..., weights_only=True)``; the file's layout is :mod:`selfclust.export`'s.
SeLa's networks need only torch and torchvision here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfclust.errors import UserError
from selfclust.export import FORMAT, TORCHVISION_ARCHS


class NotAnExport(UserError, ValueError):
    """A file ``load_backbone`` / ``load_model`` / ``selfclust assign`` cannot read as an export."""


def read_export(path: str | Path) -> dict[str, Any]:
    """An export file's contents, or :class:`NotAnExport` saying what the file is instead."""
    path = Path(path)
    if not path.is_file():
        raise NotAnExport(f"{path} is not a file: give a file written by `selfclust export`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load's unpickler raises many kinds on a foreign file
        first = type(e).__name__ + (f": {str(e).splitlines()[0][:120]}" if str(e) else "")
        raise NotAnExport(
            f"{path} is not a selfclust export (torch.load failed: {first}); make one with "
            "`selfclust export RUN_DIR --out FILE`"
        ) from None
    if not isinstance(obj, dict) or "format" not in obj:
        raise NotAnExport(
            f"{path} is not a selfclust export (no 'format' entry); make one with "
            "`selfclust export RUN_DIR --out FILE`"
        )
    if obj["format"] != FORMAT:
        kind = "a training checkpoint" if obj["format"] == 1 and "optimizer" in obj else None
        what = kind or f"format {obj['format']!r}, this selfclust reads {FORMAT!r}"
        raise NotAnExport(
            f"{path} is {what}: export it with `selfclust export` "
            "(a checkpoint: give its directory or the run dir)"
        )
    return obj


def torchvision_backbone(arch: str, channels: int = 3, small_stem: bool = False) -> nn.Module:
    """torchvision's ``resnet18`` / ``resnet50`` with ``fc = Identity`` (it returns the pooled
    features) and, for ``small_stem``, a 3×3/stride-1 ``conv1`` without max-pool; for
    ``channels != 3`` a ``conv1`` taking that many channels. An export's ``backbone`` loads
    into it with ``load_state_dict(strict=True)``."""
    from torchvision.models import resnet18, resnet50

    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"arch {arch!r} is not a torchvision ResNet ({TORCHVISION_ARCHS})")
    net = resnet18() if arch == "resnet18" else resnet50()
    if small_stem:
        net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()  # type: ignore[assignment]
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()  # type: ignore[assignment]
    return net


class Preprocess(nn.Module):
    """uint8 images ``[B, C, H, W]`` → the float input the exported backbone expects."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.side = spec["image_size"]
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(spec["mean"]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec["std"]).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(255.0)
        if self.side is not None and x.shape[-2:] != (self.side, self.side):
            x = F.interpolate(x, (self.side, self.side), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


class Backbone(nn.Module):
    """An exported backbone: ``forward(x)`` maps preprocessed images ``[B, C, H, W]`` to pooled
    features ``[B, D]``; ``preprocess`` turns uint8 images into that input."""

    def __init__(self, net: nn.Module, spec: dict[str, Any], feature_dim: int) -> None:
        super().__init__()
        self.net = net
        self.preprocess = Preprocess(spec)
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = getattr(self.net, "backbone", self.net)  # DEC/DEPICT/DGG: their encoder
        return features(x)


class ExportedModel(nn.Module):
    """An exported backbone with its clustering heads: ``forward(x)`` gives the features and one
    logit tensor per head (:class:`~selfclust.models.base.NetOutput`); :meth:`assign` the
    cluster and its probability per head."""

    def __init__(self, backbone: Backbone, heads: nn.ModuleList, best_head: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.best_head = best_head

    def forward(self, x: torch.Tensor) -> Any:
        from selfclust.models.base import NetOutput

        f = self.backbone(x)
        return NetOutput(features=f, logits=[h(f) for h in self.heads])

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster ids ``[T, B]`` and their softmax probabilities ``[T, B]``."""
        probs = torch.stack([lg.float().softmax(1) for lg in self(x).logits])
        p, ids = probs.max(2)
        return ids, p


def _sela_parts(export: dict[str, Any]) -> tuple[nn.Module, nn.ModuleList, int]:
    spec = export["preprocess"]
    if export["arch"] in TORCHVISION_ARCHS:
        net = torchvision_backbone(export["arch"], spec["channels"], export["small_stem"])
        dim = 512 if export["arch"] == "resnet18" else 2048
    elif export["arch"] == "small_resnet":
        from selfclust.models.selflabel import SmallResNet

        net = SmallResNet(spec["channels"], export["widths"])
        dim = net.out_dim
    else:
        raise NotAnExport(f"export arch {export['arch']!r} is unknown to this selfclust")
    net.load_state_dict(export["backbone"], strict=True)
    w, b = export["heads"]["weight"], export["heads"]["bias"]
    heads = nn.ModuleList(nn.Linear(w.shape[2], w.shape[1]) for _ in range(w.shape[0]))
    with torch.no_grad():
        for t, h in enumerate(heads):
            h.weight.copy_(w[t])  # type: ignore[operator]
            h.bias.copy_(b[t])  # type: ignore[operator]
    return net, heads, dim


def _cluster_net(export: dict[str, Any]) -> nn.Module:
    from selfclust.config import RunConfig
    from selfclust.methods.nets import build_cluster_net

    cfg = RunConfig.model_validate(export["identity"]["config"])
    spec = export["preprocess"]
    net = build_cluster_net(cfg, spec["channels"], spec["image_size"])
    net.load_state_dict(export["model"], strict=True)
    return net


def model_from_export(export: dict[str, Any]) -> ExportedModel:
    """:func:`load_model` of an export already read (:func:`read_export` or
    :func:`export_state`)."""
    spec = export["preprocess"]
    if export["method"] == "sela":
        net, heads, dim = _sela_parts(export)
        backbone = Backbone(net, spec, dim)
    else:
        cluster_net = _cluster_net(export)
        heads = nn.ModuleList([cluster_net.score_head()])  # type: ignore[operator]
        dim = int(cluster_net(torch.zeros(1, spec["channels"], spec["image_size"],
                                          spec["image_size"])).features.shape[1])  # fmt: skip
        backbone = Backbone(cluster_net, spec, dim)
    return ExportedModel(backbone, heads, int(export["best_head"])).eval()


def load_model(path: str | Path) -> ExportedModel:
    """The exported backbone with its heads, in eval mode."""
    return model_from_export(read_export(path))


def load_backbone(path: str | Path) -> Backbone:
    """The exported backbone, in eval mode: ``forward(x)`` gives the pooled features."""
    return load_model(path).backbone
