"""Linear probes on frozen features, per ResNet stage, and the weighted k-NN classifier.

Protocol (SeLa's per-layer tables; DINO / SwAV linear evaluation, sized for frozen features):

* Features: the global-average-pooled output of the stem and every stage
  (:meth:`SelfLabelNet.stage_features`); the backbone is frozen and in eval mode.
* Light augmentation: the backbone is frozen, so the features of an augmented image never
  change. Each training sample is embedded once clean and ``views - 1`` times with a light
  RandomResizedCrop (+ the run's horizontal flip), and epoch ``e`` trains on view ``e mod views``.
* Head: one ``nn.Linear`` per stage, no BatchNorm, on features standardised with the training
  set's mean and std (a fixed affine map that could be folded into the weights); zero init.
  SGD with momentum, cosine or step (×0.1 at 60 % and 80 %) schedule, cross-entropy.
* Split: the ``--eval-data`` shards when given; otherwise a fixed stratified split of the data
  (sklearn ``train_test_split``, ``random_state=seed``), stated in the output.

Distributed: each rank embeds only its own shards (``eval_batches``). Mini-batches are defined
over the global sample order (a seeded permutation of the training rows per epoch), each rank
computes the summed loss of the batch rows it holds, and the gradients of all stage heads are
summed with one all-reduce per step; so the result does not depend on the number of ranks
(up to float summation order). Evaluation all-reduces hit counts; k-NN is in :mod:`knn`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from selfclust import collectives as C
from selfclust.config import AugmentConfig
from selfclust.data.augment import augment, normalize
from selfclust.data.shardset import ShardSet
from selfclust.data.streams import eval_batches
from selfclust.eval.knn import knn_accuracy
from selfclust.models.selflabel import SelfLabelNet
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


@dataclass
class Features:
    stages: dict[str, torch.Tensor]  # name → [V, n_r, C] float32 (view 0 is the clean image)
    idx: torch.Tensor  # [n_r] global sample index
    cls: torch.Tensor  # [n_r] class (-1 unknown)

    def rows(self, mask: torch.Tensor, views: int | None = None) -> Features:
        v = slice(None) if views is None else slice(0, views)
        return Features(
            {k: f[v, mask] for k, f in self.stages.items()}, self.idx[mask], self.cls[mask]
        )


@torch.no_grad()
def extract(
    model: SelfLabelNet,
    shards: ShardSet,
    *,
    views: int,
    aug: AugmentConfig,
    seed: int,
    image_size: int | None,
    batch_size: int = 256,
    device: torch.device | None = None,
    loader_workers: int = 0,
    group: Any = C.WORLD,
) -> Features:
    """Stage features of this rank's shards: ``views`` embeddings per sample (0 = clean).
    Checks with one all-reduce that the ranks together saw every sample once."""
    device = device or torch.device("cpu")
    model.eval()
    rank, ws = C.rank(group), C.world_size(group)
    batches = eval_batches(shards, rank, ws, batch_size, loader_workers, image_size=image_size)
    parts: dict[str, list[list[torch.Tensor]]] = {}
    idxs, clss = [], []
    for images, idx, cls in batches:
        images = images.to(device)
        for v in range(views):
            # epoch=v keys the crop: view v of a sample is the same on any number of ranks.
            x = (
                normalize(images, image_size)
                if v == 0
                else augment(images, idx, aug, seed, v, image_size)
            )
            for name, f in model.stage_features(x).items():
                parts.setdefault(name, [[] for _ in range(views)])[v].append(f.float().cpu())
        idxs.append(idx)
        clss.append(cls)
    seen = int(C.all_reduce_sum(torch.tensor([sum(len(i) for i in idxs)]), group))
    if seen != shards.num_samples:
        raise RuntimeError(
            f"probe saw {seen} samples across ranks; the manifest says {shards.num_samples}"
        )
    if not idxs:  # a rank without shards still joins every collective
        dims = {
            n: f.shape[1]
            for n, f in model.stage_features(_dummy(model, shards, image_size)).items()
        }
        empty = {n: torch.zeros(views, 0, d) for n, d in dims.items()}
        return Features(empty, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    stages = {n: torch.stack([torch.cat(v) for v in per_view]) for n, per_view in parts.items()}
    return Features(stages, torch.cat(idxs).long(), torch.cat(clss).long())


def _dummy(model: SelfLabelNet, shards: ShardSet, size: int | None) -> torch.Tensor:
    s = size or int((shards.image or {}).get("height", 32))
    return torch.zeros(1, shards.channels, s, s, device=next(model.parameters()).device)


def stratified_split(
    idx: torch.Tensor, cls: torch.Tensor, fraction: float, seed: int
) -> torch.Tensor:
    """Boolean mask over ``idx``: True for the evaluation part. Computed from the gathered
    ``(idx, class)`` pairs, so every rank and every world size picks the same samples."""
    from sklearn.model_selection import train_test_split

    rows = C.all_gather_cat(torch.stack([idx, cls], 1))
    order = torch.argsort(rows[:, 0])
    all_idx, all_cls = rows[order, 0].numpy(), rows[order, 1].numpy()
    _, test = train_test_split(all_idx, test_size=fraction, stratify=all_cls, random_state=seed)
    return torch.from_numpy(np.isin(idx.numpy(), test))


def _lr(cfg: ProbeConfig, step: int, total: int) -> float:
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
    return cfg.lr * (0.1 ** ((step >= 0.6 * total) + (step >= 0.8 * total)))


def train_linear(
    train: Features, num_classes: int, cfg: ProbeConfig, group: Any = C.WORLD
) -> dict[str, tuple[nn.Linear, torch.Tensor, torch.Tensor]]:
    """One linear classifier per stage: ``name → (linear, mean, std)``; identical on all ranks."""
    # Global position of each local row among all training rows (sorted by idx).
    all_idx = torch.sort(C.all_gather_cat(train.idx, group)).values
    n = len(all_idx)
    gpos = torch.searchsorted(all_idx, train.idx)
    views = next(iter(train.stages.values())).shape[0]
    norm = {}
    for name, f in train.stages.items():  # mean/std of the clean view: two all-reduces
        s = C.all_reduce_sum(
            torch.stack([f[0].double().sum(0), (f[0].double() ** 2).sum(0)]), group
        )
        mean = s[0] / n
        norm[name] = (mean.float(), (s[1] / n - mean**2).clamp_min(1e-12).sqrt().float())
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
    group: Any = C.WORLD,
) -> dict[str, dict[str, float]]:
    """Top-1/top-5 per stage on the clean view; hit counts all-reduced over ranks."""
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


def probe_features(
    train: Features, test: Features, num_classes: int, cfg: ProbeConfig, group: Any = C.WORLD
) -> dict[str, Any]:
    """Linear probes per stage and k-NN on the final pool, from already extracted features."""
    heads = train_linear(train, num_classes, cfg, group)
    knn = knn_accuracy(
        train.stages["pool"][0],
        train.cls,
        test.stages["pool"][0],
        test.cls,
        num_classes,
        ks=cfg.knn_k,
        temperature=cfg.knn_temperature,
        group=group,
    )
    n = C.all_reduce_sum(torch.tensor([len(train.idx), len(test.idx)]), group)
    return {
        "linear": score_linear(heads, test, group),
        "knn": knn,
        "num_train": int(n[0]),
        "num_eval": int(n[1]),
        "num_classes": num_classes,
    }


def probe_model(
    model: SelfLabelNet,
    data: ShardSet,
    eval_data: ShardSet | None,
    cfg: ProbeConfig,
    *,
    image_size: int | None,
    batch_size: int = 256,
    device: torch.device | None = None,
    group: Any = C.WORLD,
) -> dict[str, Any]:
    """Extract features (per rank), split if needed, train and score the probes and k-NN."""
    aug = AugmentConfig(
        crop_scale=(cfg.crop_scale, 1.0),
        rotation=0,
        hflip=cfg.hflip or 0.0,
        jitter_p=0,
        grayscale=0,
    )
    kw = dict(
        aug=aug,
        seed=cfg.seed,
        image_size=image_size,
        batch_size=batch_size,
        device=device,
        group=group,
    )
    train = extract(model, data, views=cfg.views, **kw)  # type: ignore[arg-type]
    if eval_data is not None:
        test = extract(model, eval_data, views=1, **kw)  # type: ignore[arg-type]
        split = f"train: {data.root}; evaluation: {eval_data.root}"
    else:
        is_test = stratified_split(train.idx, train.cls, cfg.eval_fraction, cfg.seed)
        train, test = train.rows(~is_test), train.rows(is_test, views=1)
        split = (
            f"no evaluation shards given: fixed stratified split of {data.root}, "
            f"{1 - cfg.eval_fraction:.0%} train / {cfg.eval_fraction:.0%} evaluation "
            f"(sklearn train_test_split, random_state={cfg.seed}, by global sample index)"
        )
    labelled = C.all_reduce_sum(
        torch.tensor([int((train.cls < 0).sum() + (test.cls < 0).sum())]), group
    )
    if int(labelled):
        raise ValueError(
            "linear probes and k-NN need class labels in the shards (cls); these have none"
        )
    top = max([int(t.cls.max()) for t in (train, test) if len(t.cls)], default=-1)
    num_classes = int(C.all_reduce_max(torch.tensor([top]), group)) + 1
    result = probe_features(train, test, num_classes, cfg, group)
    result.update(split=split, protocol=asdict(cfg))
    return result
