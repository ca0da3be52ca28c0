"""Frozen per-stage features of this rank's samples, for the linear probes and k-NN.

* Features: the global-average-pooled output of the stem and every stage
  (:meth:`SelfLabelNet.stage_features`); the backbone is frozen and in eval mode.
* Light augmentation: the backbone is frozen, so the features of an augmented image never
  change. Each training sample is embedded once clean and ``views - 1`` times with a light
  RandomResizedCrop (+ the run's horizontal flip), and epoch ``e`` trains on view ``e mod views``.

Each rank embeds only its own shards (``eval_batches``); :func:`stratified_split` picks the
same evaluation samples on every rank and at every world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selfclust import collectives as C
from selfclust.config import AugmentConfig
from selfclust.data.augment import augment, normalize
from selfclust.data.shardset import ShardSet
from selfclust.data.streams import eval_batches
from selfclust.models.selflabel import SelfLabelNet


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
    group: C.Group,
) -> Features:
    """Stage features of this rank's shards: ``views`` embeddings per sample (0 = clean).
    Collective over ``group``: checks with one all-reduce that its ranks together saw every
    sample once."""
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
    idx: torch.Tensor, cls: torch.Tensor, fraction: float, seed: int, group: C.Group
) -> torch.Tensor:
    """Boolean mask over ``idx``: True for the evaluation part. Collective over ``group``:
    computed from the gathered ``(idx, class)`` pairs, so every rank and every world size picks
    the same samples."""
    from sklearn.model_selection import train_test_split

    rows = C.all_gather_cat(torch.stack([idx, cls], 1), group)
    order = torch.argsort(rows[:, 0])
    all_idx, all_cls = rows[order, 0].numpy(), rows[order, 1].numpy()
    _, test = train_test_split(all_idx, test_size=fraction, stratify=all_cls, random_state=seed)
    return torch.from_numpy(np.isin(idx.numpy(), test))
