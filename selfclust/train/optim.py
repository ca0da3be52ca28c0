"""The optimiser and LR schedule of a training phase."""

from __future__ import annotations

import torch
from torch import nn

from selfclust.config import PretrainedMethod, RunConfig
from selfclust.train.schedule import lr_at

# SGD's momentum: 0.9, as SeLa and every shipped SGD recipe (plain momentum, no Nesterov).
SGD_MOMENTUM = 0.9

Optimizers = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]


def build_optimizer(model: nn.Module, phase: str, cfg: RunConfig, cluster_steps: int) -> Optimizers:
    """Adam at ``method.pretrain_lr`` while pretraining (constant); afterwards ``optim.name``
    with ``optim.lr`` and its schedule over the ``cluster_steps`` of the clustering phase."""
    o, m = cfg.optim, cfg.method
    params = list(model.parameters())
    optimizer: torch.optim.Optimizer
    if phase == "pretrain":
        assert isinstance(m, PretrainedMethod), "only DEC, DEPICT and DGG pretrain"
        optimizer = torch.optim.Adam(params, lr=m.pretrain_lr)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    if o.name == "adam":
        optimizer = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            params,
            lr=o.lr,
            momentum=SGD_MOMENTUM,
            weight_decay=o.weight_decay,
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, cluster_steps, o) / o.lr
    )
    return optimizer, scheduler
