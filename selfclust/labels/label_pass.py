"""The label pass: features for every sample once, and what every labeller shares.

Each rank embeds the samples of its own shards (no shuffle, every sample exactly once across
ranks, checked by an all-reduced count) and keeps the pooled features ``[n_r, D]``; a
labeller (SeLa's Sinkhorn, :func:`selfclust.labels.sinkhorn.sinkhorn_labels`; k-means here;
UMAP + GMM in :mod:`~selfclust.labels.manifold`) makes this rank's labels from them. Only the
final labels (``n_r × T`` small integers with their ``idx``) are all-gathered into every
rank's bank (:func:`gather_bank`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from selfclust import collectives as C
from selfclust.data.augment import normalize
from selfclust.errors import DataError, ShardsChanged
from selfclust.labels.kmeans import LLOYD_ITERS, Seeding, assign, distributed_centroids
from selfclust.labels.sample import sample_pool
from selfclust.labels.sinkhorn_logits import head_logits
from selfclust.seeds import head_seed


@dataclass
class Embedded:
    features: torch.Tensor  # [n_r, D] float32, on the compute device
    idx: torch.Tensor  # [n_r] int64 global sample index, CPU
    cls: torch.Tensor  # [n_r] int64 ground truth (-1 unknown), CPU; evaluation only
    skipped: int = 0  # samples of all ranks that were not delivered (corrupt or unreadable)


@torch.no_grad()
def embed(
    backbone: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    device: torch.device,
    size: int | None,
    num_samples: int,
    *,
    group: C.Group,
    transform: Callable[[torch.Tensor, int | None], torch.Tensor] = normalize,
) -> Embedded:
    """Pooled features of every sample this rank reads (``transform`` turns the uint8 images
    into the network's input: standardised by default, [0, 1] pixels for DEC/DEPICT/DGG).

    Collective over ``group``: checks, with one all-reduce over its ranks, that the samples
    seen plus those the reader skipped as bad data (``batches.stats``, when it has one) equal N.
    """
    module = backbone if isinstance(backbone, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    feats, idxs, clss = [], [], []
    for images, idx, cls in batches:
        x = transform(images.to(device, non_blocking=True), size)
        feats.append(backbone(x).float())
        idxs.append(idx)
        clss.append(cls)
    if module is not None:
        module.train(was_training)
    # Count first, on every rank, so that a rank with nothing to read cannot raise alone.
    local = sum(len(i) for i in idxs)
    stats = getattr(batches, "stats", None)
    skipped = stats.skipped if stats is not None else 0
    counts = C.all_reduce_sum(
        torch.tensor([local, int(local == 0), skipped], dtype=torch.int64), group
    )
    if int(counts[1]):
        raise DataError(
            f"{int(counts[1])} rank(s) read no samples in the label pass: the dataset has fewer "
            "shards than ranks can share; write smaller shards (--shard-size) or use fewer workers"
        )
    seen, bad = int(counts[0]), int(counts[2])
    out = Embedded(_concat(feats), torch.cat(idxs).long(), torch.cat(clss).long(), bad)
    if seen + bad != num_samples:
        raise ShardsChanged(
            f"label pass saw {seen} samples (and skipped {bad} bad ones) across all ranks, the "
            f"manifest says {num_samples}: shards were changed after writing, or a sample "
            "index appears twice; rewrite them with `selfclust shard`"
        )
    return out


def _concat(chunks: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(chunks)``, emptying ``chunks`` as it copies: the peak is the result plus
    one chunk rather than two copies of the features (ImageNet on one GPU: 10 GB, not 21)."""
    out = chunks[0].new_empty((sum(len(c) for c in chunks), *chunks[0].shape[1:]))
    at = 0
    for i, c in enumerate(chunks):
        out[at : at + len(c)] = c
        at += len(c)
        chunks[i] = out[:0]  # drops the list's reference: the chunk is freed
    return out


def thumbnails(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Feature map for k-means on raw pixels: images area-pooled to s×s with s = min(size,
    their side) (never upsampled), flattened."""

    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, min(size, x.shape[-1])).flatten(1)

    return features


def gather_bank(
    local_labels: torch.Tensor,
    idx: torch.Tensor,
    num_samples: int,
    *,
    group: C.Group,
    skipped: int = 0,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scatter every rank's ``[T, n_r]`` labels into a full ``[T, N]`` bank on every rank, of
    ``fill``'s type (the bank's compact one; int64 without ``fill``). Collective over
    ``group``: two all-gathers, of the ``n_r`` int64 indices and of the ``[n_r, T]`` labels in
    the bank's type (ImageNet × 10 heads in int16: 36 MB per rank, not 113 MB as int64 rows).

    ``skipped`` samples (bad data, counted by the label pass) may be absent; their columns
    keep ``fill``'s labels (the current bank): they are never trained on anyway.
    """
    dtype = fill.dtype if fill is not None else torch.int64
    gidx = C.all_gather_cat(idx.long().contiguous(), group)
    # As bytes, [n_r, T × itemsize]: gloo has no int16; the type is restored after the gather.
    T, width = local_labels.shape[0], local_labels.shape[0] * dtype.itemsize
    flat = local_labels.t().to(dtype).contiguous().reshape(-1)
    wire = flat.view(torch.uint8).reshape(len(flat) // max(T, 1), width)
    labels = C.all_gather_cat(wire, group).reshape(-1).view(dtype).reshape(-1, T)  # [N', T]
    in_range = len(gidx) == 0 or (int(gidx.min()) >= 0 and int(gidx.max()) < num_samples)
    unique = False
    if in_range:  # an O(N) check (a sort of N indices took seconds at 100M)
        seen = torch.zeros(num_samples, dtype=torch.bool)
        seen[gidx] = True
        unique = int(seen.sum()) == len(gidx)
    if not (unique and in_range and len(gidx) + skipped == num_samples):
        raise ShardsChanged(
            "label pass did not see every sample index exactly once across ranks "
            f"({len(gidx)} rows + {skipped} skipped for N={num_samples}): duplicate or "
            "out-of-range idx in the shards"
        )
    if skipped and fill is None:
        raise RuntimeError(f"{skipped} samples were skipped and no labels were given to keep")
    bank = (
        fill.clone() if skipped and fill is not None else torch.empty(T, num_samples, dtype=dtype)
    )
    bank[:, gidx] = labels.t()
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
    *,
    group: C.Group,
    init_heads: nn.ModuleList | None = None,
    niter: int = LLOYD_ITERS,
    seeding: Seeding = "random",
    tol: float = 0.0,
) -> torch.Tensor:
    """Initial labels ``[T, n_r]`` by k-means (one run per head, seeds seed..seed+T−1;
    ``niter``, ``seeding``, ``tol`` as :func:`selfclust.labels.kmeans.kmeans`). Collective
    over ``group``.

    The sample is chosen by global index (a seeded permutation of 0..N-1, first ``samples``),
    so it is the same whatever the number of ranks; each rank sends only its part of it
    (L2-normalised features), rank 0 runs k-means (faiss, GPU build if present, else the
    torch fallback on CUDA; see :mod:`selfclust.labels.kmeans`) and broadcasts the centroids, and
    each rank assigns its own rows. With ``init_heads`` (linear heads on the same features)
    each head is also set to score its centroids: see :func:`heads_from_centroids`.
    """
    f = emb.features.float()
    if l2_normalize:
        f = torch.nn.functional.normalize(f, dim=1)
    pool = sample_pool(f, emb.idx, num_samples, samples, seed, group)
    centroids = distributed_centroids(
        pool, heads, clusters, seed, niter, f.device, group, seeding=seeding, tol=tol
    )
    if init_heads is not None:
        norm = mean_feature_norm(emb.features, group)
        heads_from_centroids(init_heads, centroids, norm, l2_normalize)
    return torch.stack([assign(f, centroids[t]) for t in range(heads)])


def mean_feature_norm(features: torch.Tensor, group: C.Group) -> float:
    """The mean L2 norm of the features' rows over all ranks (collective; a rank may hold
    none): the scale :func:`heads_from_centroids` gives heads on normalised centroids."""
    norms = features.float().norm(dim=1).sum().cpu()
    total = C.all_reduce_sum(torch.stack([norms, torch.tensor(float(len(features)))]), group)
    return float(total[0] / total[1])


@torch.no_grad()
def heads_from_centroids(
    heads: nn.ModuleList, centroids: torch.Tensor, feature_norm: float, normalized: bool
) -> None:
    """Set linear head t to ``z_k = c_k · f / s − ||c_k||² / 2`` (s = mean feature norm if the
    centroids live on L2-normalised features, else 1): its argmax is the nearest centroid
    (exactly for unnormalised centroids, for features of norm s otherwise), so the first
    Sinkhorn pass starts from the k-means partition instead of random weights."""
    s = feature_norm if normalized else 1.0
    for head, c in zip(heads, centroids, strict=True):
        linear = cast(nn.Linear, head)
        if linear.weight.shape != c.shape:
            raise ValueError(
                f"cannot initialise a head of shape {tuple(linear.weight.shape)} from centroids "
                f"{tuple(c.shape)}: k-means must run on the features the heads read"
            )
        linear.weight.copy_(c / s)
        linear.bias.copy_(-0.5 * c.square().sum(dim=1))


def random_bank(heads: int, num_samples: int, clusters: int, seed: int) -> torch.Tensor:
    """Equal-size random labels ``[T, N]``: a seeded permutation of 0..N-1, modulo K."""
    out = []
    for t in range(heads):
        g = torch.Generator().manual_seed(head_seed(seed, t))
        out.append(torch.randperm(num_samples, generator=g) % clusters)
    return torch.stack(out)
