"""``method.name`` → the network a run builds and the method that trains it.

SeLa trains :class:`~selfclust.models.selflabel.SelfLabelNet` (a ResNet, ``model.*``); DEC,
DEPICT and DGG their papers' own networks (:mod:`selfclust.methods.nets`).
"""

from __future__ import annotations

from typing import Any

import torch

from selfclust.config import RunConfig
from selfclust.methods.base import Method
from selfclust.methods.dec_runner import DECRunner
from selfclust.methods.depict_runner import DEPICTRunner
from selfclust.methods.dgg_runner import DGGRunner
from selfclust.methods.nets import ClusterNet, build_cluster_net
from selfclust.methods.runner import MethodRunner
from selfclust.methods.sela import SeLa
from selfclust.models.selflabel import SelfLabelNet
from selfclust.train.step import Precision


def build_model(cfg: RunConfig, channels: int, side: int | None) -> SelfLabelNet | ClusterNet:
    """The network of ``cfg.method.name`` for images of ``channels`` × ``side`` × ``side``."""
    m = cfg.method
    if m.name == "sela":
        return SelfLabelNet(cfg.model, channels, m.heads, m.clusters)
    return build_cluster_net(cfg, channels, side)


def build_runner(cfg: RunConfig, model: ClusterNet, num_samples: int, **on: Any) -> MethodRunner:
    """The method of ``cfg.method.name`` (dec, depict or dgg) for ``model``; ``on``: the
    ``device``, ``image_size`` and ``rank`` it trains with (default: CPU, native, rank 0)."""
    runners: dict[str, type[MethodRunner]] = {
        "dec": DECRunner,
        "depict": DEPICTRunner,
        "dgg": DGGRunner,
    }
    return runners[cfg.method.name](cfg, model, num_samples, **on)


def build_method(
    cfg: RunConfig,
    model: SelfLabelNet | ClusterNet,
    num_samples: int,
    *,
    device: torch.device,
    image_size: int | None,
    rank: int,
    precision: Precision,
) -> Method:
    """The :class:`~selfclust.methods.base.Method` of ``cfg.method.name`` training ``model``."""
    if isinstance(model, SelfLabelNet):
        return SeLa(cfg, model, num_samples, device, image_size, precision)
    return build_runner(cfg, model, num_samples, device=device, image_size=image_size, rank=rank)
