"""ResNet backbone with T linear clustering heads.

``SelfLabelNet(x)`` returns :class:`NetOutput` (pooled features and one logit tensor per head);
no mode flags. Backbones are torchvision's ResNets; ``small_stem`` swaps the 7×7/stride-2 stem
and max-pool for a 3×3/stride-1 conv, as is usual for 16–32 px images. ``small_resnet`` is a
narrow 3-stage ResNet from torchvision's BasicBlocks for the CPU quickstart.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock

from selfclust.config import ModelConfig
from selfclust.models.base import NetOutput


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
        )
    layers: list[nn.Module] = [BasicBlock(cin, cout, stride=stride, downsample=down)]
    layers += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class SmallResNet(nn.Module):
    """conv3×3 stem → stages of BasicBlocks (stride 2 after the first) → global average pool."""

    def __init__(self, in_channels: int, widths: list[int], blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(_stage(cin, w, blocks, stride=1 if i == 0 else 2))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1)


def _torchvision_backbone(arch: str, in_channels: int, small_stem: bool) -> tuple[nn.Module, int]:
    net = resnet18() if arch == "resnet18" else resnet50()
    if small_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class SelfLabelNet(nn.Module):
    def __init__(self, cfg: ModelConfig, in_channels: int, heads: int, clusters: int) -> None:
        super().__init__()
        if cfg.arch == "small_resnet":
            self.backbone: nn.Module = SmallResNet(in_channels, cfg.widths)
            dim = self.backbone.out_dim  # type: ignore[assignment]
        else:
            self.backbone, dim = _torchvision_backbone(cfg.arch, in_channels, cfg.small_stem)
        self.feature_dim = int(dim)
        self.heads = nn.ModuleList(nn.Linear(self.feature_dim, clusters) for _ in range(heads))

    def forward(self, x: torch.Tensor) -> NetOutput:
        f = self.backbone(x)
        return NetOutput(features=f, logits=[h(f) for h in self.heads])

    def stage_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Global-average-pooled output of the stem and every ResNet stage, ``name → [B, C]``,
        for linear probes (as SeLa probes conv1..res5). The last stage's entry is named
        ``pool``: it equals ``backbone(x)``, the features the heads see."""
        b = self.backbone
        if isinstance(b, SmallResNet):
            names = ["stem"] + [f"stage{i + 1}" for i in range(len(b.stages))]
            parts: list[nn.Module] = [b.stem, *b.stages]
        else:  # torchvision ResNet: conv1 block (with max-pool), layer1..layer4
            stem = nn.Sequential(b.conv1, b.bn1, b.relu, b.maxpool)  # type: ignore[arg-type]
            names = ["conv1", "layer1", "layer2", "layer3", "layer4"]
            parts = [stem, b.layer1, b.layer2, b.layer3, b.layer4]  # type: ignore[list-item]
        names[-1] = "pool"
        out: dict[str, torch.Tensor] = {}
        for name, part in zip(names, parts, strict=True):
            x = part(x)
            out[name] = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return out
