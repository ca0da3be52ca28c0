"""Which network a run builds: ``method.name`` → its model.

SeLa trains :class:`~selfclust.models.selflabel.SelfLabelNet` (a ResNet, ``model.*``); DEC,
DEPICT and DGG their papers' own networks (:mod:`selfclust.methods.nets`).
"""

from __future__ import annotations

from selfclust.config import RunConfig
from selfclust.methods.nets import ClusterNet, build_cluster_net
from selfclust.models.selflabel import SelfLabelNet


def build_model(cfg: RunConfig, channels: int, side: int | None) -> SelfLabelNet | ClusterNet:
    """The network of ``cfg.method.name`` for images of ``channels`` × ``side`` × ``side``."""
    m = cfg.method
    if m.name == "sela":
        return SelfLabelNet(cfg.model, channels, m.heads, m.clusters)
    return build_cluster_net(cfg, channels, side)
