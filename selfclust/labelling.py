"""The label pass: features for every sample once, then pseudo-labels per head.

Each rank embeds the samples of its own shards (no shuffle, every sample exactly once across
ranks, checked by an all-reduced count), keeps the pooled features ``[n_r, D]``, and for one
head at a time recomputes that head's logits ``[n_r, K]`` from them (the heads are linear), runs
the distributed Sinkhorn-Knopp on its own rows and drops the block. Only the final labels
(``n_r × T`` small integers with their ``idx``) are all-gathered into every rank's bank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from selfclust import collectives as C
from selfclust.augment import normalize
from selfclust.sinkhorn import sinkhorn_knopp


@dataclass
class Embedded:
    features: torch.Tensor  # [n_r, D] float32, on the compute device
    idx: torch.Tensor  # [n_r] int64 global sample index, CPU
    cls: torch.Tensor  # [n_r] int64 ground truth (-1 unknown), CPU; evaluation only


@torch.no_grad()
def embed(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    device: torch.device,
    size: int | None,
    num_samples: int,
    group: Any = C.WORLD,
) -> Embedded:
    """Pooled features of every sample this rank reads; checks the global count equals N."""
    module = backbone if isinstance(backbone, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    feats, idxs, clss = [], [], []
    for images, idx, cls in batches:
        x = normalize(images.to(device, non_blocking=True), size)
        feats.append(backbone(x).float())
        idxs.append(idx)
        clss.append(cls)
    if module is not None:
        module.train(was_training)
    # Count first, on every rank, so that a rank with nothing to read cannot raise alone.
    local = sum(len(i) for i in idxs)
    counts = C.all_reduce_sum(torch.tensor([local, int(local == 0)], dtype=torch.int64), group)
    if int(counts[1]):
        raise RuntimeError(
            f"{int(counts[1])} rank(s) read no samples in the label pass: the dataset has fewer "
            "shards than ranks can share; write smaller shards (--shard-size) or use fewer workers"
        )
    out = Embedded(torch.cat(feats), torch.cat(idxs).long(), torch.cat(clss).long())
    seen = counts[:1]
    if int(seen.item()) != num_samples:
        raise RuntimeError(
            f"label pass saw {int(seen.item())} samples across all ranks, the manifest says "
            f"{num_samples}: shards are missing, unreadable or were changed after writing"
        )
    return out


def thumbnails(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Feature map for k-means on raw pixels: images area-pooled to size×size, flattened."""

    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, size).flatten(1)

    return features


def head_logits(head: nn.Module, features: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """[n, D] features → [n, K] float32 logits of one linear head, computed in row chunks."""
    linear = cast(nn.Linear, head)
    w, b = linear.weight.detach().float(), linear.bias.detach().float()
    return torch.cat([torch.addmm(b, f, w.t()) for f in features.split(chunk)])


@dataclass
class RelabelStats:
    iterations: list[int]
    errors: list[float]


def sinkhorn_labels(
    heads: nn.ModuleList,
    emb: Embedded,
    lam: float,
    tol: float,
    max_iters: int,
    group: Any = C.WORLD,
) -> tuple[torch.Tensor, RelabelStats]:
    """Labels ``[T, n_r]`` for this rank's rows; one head's logits block alive at a time."""
    labels, its, errs = [], [], []
    for head in heads:
        z = head_logits(head, emb.features)
        res = sinkhorn_knopp(z, lam, tol=tol, max_iters=max_iters, group=group)
        del z
        labels.append(res.labels.cpu())
        its.append(int(res.iterations))
        errs.append(float(res.error))
    return torch.stack(labels), RelabelStats(its, errs)


def gather_bank(
    local_labels: torch.Tensor, idx: torch.Tensor, num_samples: int, group: Any = C.WORLD
) -> torch.Tensor:
    """Scatter every rank's ``[T, n_r]`` labels into a full ``[T, N]`` bank on every rank."""
    rows = torch.cat([idx[:, None], local_labels.t()], dim=1).contiguous()  # [n_r, 1 + T]
    everything = C.all_gather_cat(rows, group)
    gidx = everything[:, 0]
    if len(gidx) != num_samples or not torch.equal(
        torch.sort(gidx).values, torch.arange(num_samples, dtype=gidx.dtype)
    ):
        raise RuntimeError(
            "label pass did not see every sample index exactly once across ranks "
            f"({len(gidx)} rows for N={num_samples}): duplicate or missing idx in the shards"
        )
    bank = torch.empty(local_labels.shape[0], num_samples, dtype=torch.int64)
    bank[:, gidx] = everything[:, 1:].t()
    return bank


def predictions(heads: nn.ModuleList, emb: Embedded) -> torch.Tensor:
    """Network predictions (argmax per head) ``[T, n_r]`` for this rank's rows."""
    return torch.stack([head_logits(h, emb.features).argmax(1).cpu() for h in heads])


def kmeans_labels(
    emb: Embedded,
    heads: int,
    clusters: int,
    samples: int,
    seed: int,
    num_samples: int,
    l2_normalize: bool = True,
    group: Any = C.WORLD,
) -> torch.Tensor:
    """Initial labels ``[T, n_r]`` by faiss k-means (one run per head, different seeds).

    The sample is chosen by global index (a seeded permutation of 0..N-1, first ``samples``),
    so it is the same whatever the number of ranks; each rank sends only its part of it
    (L2-normalised features), rank 0 runs k-means on the pool sorted by idx and broadcasts the
    centroids, and each rank assigns its own rows.
    """
    import faiss

    f = emb.features.float().cpu()
    if l2_normalize:
        f = torch.nn.functional.normalize(f, dim=1)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + 7919))
    position = torch.empty_like(order)
    position[order] = torch.arange(num_samples)
    mine = position[emb.idx] < samples
    pool_idx = C.all_gather_cat(emb.idx[mine], group)  # int64: exact at any N
    pool = C.all_gather_cat(f[mine], group)[torch.argsort(pool_idx)]
    if len(pool) < clusters:
        raise ValueError(
            f"k-means needs at least K={clusters} sampled features, got {len(pool)}: raise "
            "method.kmeans_samples or lower method.clusters"
        )
    d = f.shape[1]
    centroids = torch.zeros(heads, clusters, d)
    if C.rank(group) == 0:
        x = np.ascontiguousarray(pool.numpy(), dtype=np.float32)
        for t in range(heads):
            km = faiss.Kmeans(d, clusters, niter=25, seed=seed + t, max_points_per_centroid=10**9)
            km.train(x)
            centroids[t] = torch.from_numpy(km.centroids)
    C.broadcast(centroids, 0, group)
    out = []
    q = np.ascontiguousarray(f.numpy(), dtype=np.float32)
    for t in range(heads):
        index = faiss.IndexFlatL2(d)
        index.add(np.ascontiguousarray(centroids[t].numpy()))
        _, assign = index.search(q, 1)
        out.append(torch.from_numpy(assign[:, 0]).long())
    return torch.stack(out)


def random_bank(heads: int, num_samples: int, clusters: int, seed: int) -> torch.Tensor:
    """Equal-size random labels ``[T, N]``: a seeded permutation of 0..N-1, modulo K."""
    out = []
    for t in range(heads):
        g = torch.Generator().manual_seed(seed * 1000 + t)
        out.append(torch.randperm(num_samples, generator=g) % clusters)
    return torch.stack(out)
