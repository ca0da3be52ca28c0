"""Linear probes on frozen features: one linear head per ResNet stage, trained and scored.

* Head: one ``nn.Linear`` per stage, no BatchNorm, on features standardised with the training
  set's mean and std (a fixed affine map that could be folded into the weights); zero init.
  SGD with momentum, cosine or step (×0.1 at 60 % and 80 %) schedule, cross-entropy.

Distributed: mini-batches are defined over the global sample order (a seeded permutation of
the training rows per epoch), each rank computes the summed loss of the batch rows it holds,
and the gradients of all stage heads are summed with one all-reduce per step; so the result
does not depend on the number of ranks (up to float summation order). Evaluation all-reduces
hit counts. The whole protocol (features, split, k-NN) is :mod:`selfclust.eval.probe_protocol`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from selfclust import collectives as C
from selfclust.eval.features import Features
from selfclust.seeds import probe_epoch_seed


@dataclass
class ProbeConfig:
    epochs: int = 30
    batch_size: int = 256  # global
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"  # or "step"
    views: int = 3  # clean + 2 augmented views per training sample
    crop_scale: float = 0.6  # RandomResizedCrop scale range [crop_scale, 1]
    hflip: float | None = None  # flip probability of the crops; None: the run's augment.hflip
    seed: int = 0
    eval_fraction: float = 0.2  # stratified split when no evaluation shards are given
    knn_k: tuple[int, ...] = (20, 200)
    knn_temperature: float = 0.07

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.views < 1:
            raise ValueError("probe epochs, batch_size, views must be >= 1 and lr > 0")
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"probe schedule must be 'cosine' or 'step', got {self.schedule!r}")
        if not 0 < self.crop_scale <= 1 or not 0 < self.eval_fraction < 1:
            raise ValueError("crop_scale must be in (0, 1] and eval_fraction in (0, 1)")


def _lr(cfg: ProbeConfig, step: int, total: int) -> float:
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
    return cfg.lr * (0.1 ** ((step >= 0.6 * total) + (step >= 0.8 * total)))


def _clean_view_norm(
    train: Features, n: int, group: C.Group
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per stage, the mean and std [C] of the clean view over all ``n`` training rows: sums of
    x and x² in float64, one all-reduce of [2, C] per stage."""
    norm = {}
    for name, f in train.stages.items():
        s = C.all_reduce_sum(
            torch.stack([f[0].double().sum(0), (f[0].double() ** 2).sum(0)]), group
        )
        mean = s[0] / n
        norm[name] = (mean.float(), (s[1] / n - mean**2).clamp_min(1e-12).sqrt().float())
    return norm


def train_linear(
    train: Features, num_classes: int, cfg: ProbeConfig, group: C.Group
) -> dict[str, tuple[nn.Linear, torch.Tensor, torch.Tensor]]:
    """One linear classifier per stage: ``name → (linear, mean, std)``; identical on all ranks.
    Collective over ``group`` (one all-reduce of every head's gradients per step)."""
    # Global position of each local row among all training rows (sorted by idx).
    all_idx = torch.sort(C.all_gather_cat(train.idx, group)).values
    n = len(all_idx)
    gpos = torch.searchsorted(all_idx, train.idx)
    views = next(iter(train.stages.values())).shape[0]
    norm = _clean_view_norm(train, n, group)
    heads = {name: nn.Linear(f.shape[2], num_classes) for name, f in train.stages.items()}
    params = [p for h in heads.values() for p in h.parameters()]
    for p in params:
        nn.init.zeros_(p)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = -(-n // cfg.batch_size)
    total, step = steps * cfg.epochs, 0
    y = train.cls
    for epoch in range(cfg.epochs):
        perm = torch.randperm(
            n, generator=torch.Generator().manual_seed(probe_epoch_seed(cfg.seed, epoch))
        )
        where = torch.empty(n, dtype=torch.int64)
        where[perm] = torch.arange(n)
        local_pos, local_rows = torch.sort(where[gpos])  # this rank's rows in epoch order
        bounds = torch.searchsorted(local_pos, torch.arange(0, steps + 1) * cfg.batch_size)
        v = epoch % views
        for b in range(steps):
            rows = local_rows[int(bounds[b]) : int(bounds[b + 1])]
            losses = [
                nn.functional.cross_entropy(
                    heads[k]((f[v, rows] - norm[k][0]) / norm[k][1]), y[rows], reduction="sum"
                )
                for k, f in train.stages.items()
            ]
            grads = (
                torch.autograd.grad(torch.stack(losses).sum(), params)
                if len(rows)
                else [torch.zeros_like(p) for p in params]
            )
            flat = C.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), group)  # one call
            flat /= min(cfg.batch_size, n - b * cfg.batch_size)  # mean over the global batch
            for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.grad = g.view_as(p)
            for group_ in opt.param_groups:
                group_["lr"] = _lr(cfg, step, total)
            opt.step()
            step += 1
    return {k: (heads[k], *norm[k]) for k in heads}


@torch.no_grad()
def score_linear(
    heads: dict[str, tuple[nn.Linear, torch.Tensor, torch.Tensor]],
    test: Features,
    group: C.Group,
) -> dict[str, dict[str, float]]:
    """Top-1/top-5 per stage on the clean view; hit counts all-reduced over the ranks of
    ``group`` (a collective)."""
    out = {}
    for name, (lin, mean, std) in heads.items():
        z = lin((test.stages[name][0] - mean) / std)
        k5 = min(5, z.shape[1])
        top = z.topk(k5, dim=1).indices if len(z) else torch.zeros(0, k5, dtype=torch.int64)
        hits = torch.tensor(
            [
                float((top[:, 0] == test.cls).sum()),
                float((top == test.cls[:, None]).any(1).sum()),
                len(z),
            ],
            dtype=torch.float64,
        )
        h = C.all_reduce_sum(hits, group)
        out[name] = {
            "dim": int(lin.in_features),
            "top1": float(h[0] / h[2]),
            "top5": float(h[1] / h[2]),
        }
    return out
