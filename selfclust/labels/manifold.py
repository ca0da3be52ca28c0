"""Manifold clustering of learned features: UMAP, then a Gaussian mixture (as N2D does).

k-means on a network's pooled features cuts the feature space into Voronoi cells, but the
classes of a trained backbone lie on curved, elongated manifolds: on MNIST-test a SeLa
backbone whose 10-NN are 95 % same-class gives k-means ACC 0.875 and UMAP + GMM 0.958.
UMAP (McInnes et al. 2018) keeps the k-NN structure in a few dimensions (``min_dist=0`` packs
each manifold tightly); a full-covariance Gaussian mixture then finds the clusters there,
with unequal sizes allowed (USPS's classes range from 7.6 % to 16.4 % of the set).

Distributed use, like :mod:`selfclust.labels.kmeans`: every rank contributes its rows of a sample
chosen by *global* index (bounded by ``samples``: UMAP and the mixture run on rank 0, on the
CPU; about 10 s for 10k points on one core, after 15–30 s of numba compilation), rank 0
clusters the pool and broadcasts the pool's labels, and every rank labels its own rows: pool
rows keep their cluster, the others take the similarity-weighted vote of their nearest pool
rows (faiss, exact inner product on L2-normalised features). Only the pool
(``samples × D``) and ``T × samples`` labels travel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from selfclust import collectives as C
from selfclust.labels.kmeans import _check_not_in_loader_worker, _faiss
from selfclust.labels.sample import global_sample, sample_pool
from selfclust.seeds import candidate_seed
from selfclust.threads import keep_torch_threads

# UMAP's n_neighbors by default (method.manifold_neighbors; UMAP's own default is 15).
UMAP_NEIGHBORS = 20

Select = Literal["silhouette", "consensus"]  # how cluster_pool picks among candidates


def cluster_pool(
    x: np.ndarray,
    k: int,
    seed: int,
    neighbors: int = UMAP_NEIGHBORS,
    dim: int = 10,
    restarts: int = 3,
    candidates: int = 1,
    select: Select = "silhouette",
) -> np.ndarray:
    """Labels ``[n]`` of the rows of ``x`` ([n, D] float32): UMAP to ``dim`` dimensions with
    ``neighbors`` neighbours (seeded: deterministic, single-threaded), then a Gaussian mixture
    of k full-covariance components, best of ``restarts`` EM runs by likelihood.

    With ``candidates`` > 1, that many UMAP embeddings (seeds ``seed``, ``seed + 7919``, ...)
    are clustered and one partition is kept. ``select="silhouette"`` (the default) keeps the
    partition with the highest cosine silhouette on ``x - x.min()`` (shifted so that
    standardised pixels are intensities again, darkest 0). ``select="consensus"`` keeps the
    one that agrees best with the others: the highest mean adjusted Rand index to the other
    candidates (sklearn), the medoid of the candidates; it needs 3 or more. Neither is always
    right. On DGG's pretrained USPS embeddings (4 candidates), seed 2's were at ACC 0.81 /
    0.83 / 0.96 / 0.96 with mean ARI 0.86 / 0.88 / 0.91 / 0.91: the consensus keeps a 0.96
    one, the silhouette kept the 0.81 one (0.232 against 0.154-0.221). On seed 1 three
    candidates shared one bad partition and the consensus kept it (a 0.76 start against the
    silhouette's 0.89), as it does on USPS pixels, seed 2, where 5 of 8 are bad.

    The mixture's likelihood cannot choose between embeddings (each has its own space), and
    within one it can prefer splitting a large class and merging two others: on USPS pixels
    6 of 12 seeds' partitions reach ACC 0.95-0.96, the other 6 split the 0s and merge 4/9 or
    3/5 (ACC 0.80-0.81). The cosine silhouette of intensities ranks every good one
    (0.206-0.208) above every bad one (0.194-0.201); the Euclidean silhouette, and the cosine
    one of standardised (centred) pixels, rank them the other way."""
    _check_not_in_loader_worker()
    if len(x) <= max(k, neighbors):
        raise ValueError(
            f"manifold clustering needs more than max(K={k}, neighbours={neighbors}) samples, "
            f"got {len(x)}: raise method.kmeans_samples or lower method.clusters"
        )
    logging.getLogger("numba").setLevel(logging.WARNING)
    if select == "consensus" and candidates == 2:
        raise ValueError(
            f"consensus selection needs 3 or more candidates, got {candidates}: the mean "
            "agreement of two partitions is the same for both"
        )
    log = logging.getLogger(__name__)
    with keep_torch_threads():  # UMAP and pynndescent run on numba's OpenMP pool
        parts = _partitions(x, k, seed, neighbors, dim, restarts, candidates)
    if candidates == 1:
        return parts[0]
    scores = _candidate_scores(x, parts, select, seed)
    for c, score in enumerate(scores):
        log.info("manifold candidate %d: %s %.4f", c, select, score)
    best = int(np.argmax(scores))  # the first of equals
    log.info("manifold candidate %d kept (%s)", best, select)
    return parts[best]


def _candidate_scores(
    x: np.ndarray, parts: list[np.ndarray], select: Select, seed: int
) -> np.ndarray:
    """One score per candidate partition of ``x``, higher is better (see cluster_pool)."""
    if select == "consensus":
        return consensus_scores(parts)
    from sklearn.metrics import silhouette_score

    # O(n²) distances: score at most 10,000 rows (a fixed subset, the same for all).
    scored = x - x.min()  # standardised pixels → intensities (0 = darkest), see cluster_pool
    return np.array([
        silhouette_score(scored, p, metric="cosine", sample_size=min(len(x), 10_000),
                         random_state=seed) if len(np.unique(p)) > 1 else -np.inf
        for p in parts
    ])  # fmt: skip


def _partitions(
    x: np.ndarray, k: int, seed: int, neighbors: int, dim: int, restarts: int, candidates: int
) -> list[np.ndarray]:
    """One UMAP + GMM partition per candidate seed (``seed + 7919 c``)."""
    import umap
    from sklearn.mixture import GaussianMixture

    parts = []
    for c in range(candidates):
        s = candidate_seed(seed, c)
        z = umap.UMAP(
            n_neighbors=neighbors,
            n_components=dim,
            min_dist=0.0,
            random_state=s,  # seeded UMAP is single-threaded and deterministic
            n_jobs=1,  # (said explicitly: otherwise UMAP warns that it overrides n_jobs)
        ).fit_transform(x)
        gmm = GaussianMixture(k, covariance_type="full", n_init=restarts, random_state=s)
        parts.append(gmm.fit(z).predict(z).astype(np.int64))
    return parts


def consensus_scores(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Each partition's mean adjusted Rand index to the other partitions ``[len(parts)]``."""
    from sklearn.metrics import adjusted_rand_score

    n = len(parts)
    if n < 2:
        raise ValueError(f"need at least 2 partitions to compare, got {n}")
    agree = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            agree[i, j] = agree[j, i] = adjusted_rand_score(parts[i], parts[j])
    return agree.sum(1) / (n - 1)


def match_ids(new: np.ndarray, old: np.ndarray, k: int) -> np.ndarray:
    """``new`` labels renamed so that as many samples as possible keep their ``old`` id."""
    from scipy.optimize import linear_sum_assignment

    overlap = np.bincount(new * k + old, minlength=k * k).reshape(k, k)
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    rename = np.empty(k, dtype=np.int64)
    rename[rows] = cols
    return rename[new]


def vote(
    pool: torch.Tensor, pool_labels: torch.Tensor, x: torch.Tensor, k: int, neighbours: int = 10
) -> torch.Tensor:
    """Label of each row of ``x`` by the similarity-weighted vote of its ``neighbours`` nearest
    ``pool`` rows (all L2-normalised: exact inner product, faiss on the CPU). ``pool_labels``
    is ``[P]`` or ``[T, P]`` (one vote per head on the same neighbours: one search)."""
    heads = pool_labels.reshape(-1, len(pool))
    if len(x) == 0:
        return torch.zeros(pool_labels.shape[:-1] + (0,), dtype=torch.int64)
    faiss = _faiss()
    index = faiss.IndexFlatIP(pool.shape[1])
    index.add(np.ascontiguousarray(pool.float().cpu().numpy()))
    n = min(neighbours, len(pool))
    sim, nn = index.search(np.ascontiguousarray(x.float().cpu().numpy()), n)
    weights = torch.from_numpy(sim).double().clamp_min(0) + 1e-6
    neighbour = torch.from_numpy(nn)
    out = torch.empty(len(heads), len(x), dtype=torch.int64)
    for t, labels in enumerate(heads):
        votes = torch.zeros(len(x), k, dtype=torch.float64)
        votes.scatter_add_(1, labels[neighbour], weights)
        out[t] = votes.argmax(1)
    return out.reshape(pool_labels.shape[:-1] + (len(x),))


def manifold_labels(
    features: torch.Tensor,
    idx: torch.Tensor,
    heads: int,
    clusters: int,
    samples: int,
    seed: int,
    num_samples: int,
    neighbors: int = UMAP_NEIGHBORS,
    dim: int = 10,
    restarts: int = 3,
    candidates: int = 1,
    l2_normalize: bool = True,
    align_to: torch.Tensor | None = None,
    *,
    group: C.Group,
    select: Select = "silhouette",
) -> torch.Tensor:
    """Labels ``[T, n_r]`` for this rank's rows (``features`` [n_r, D], global ``idx``): one
    UMAP + GMM partition of the global sample per head (seeds seed..seed+T−1), computed on
    rank 0 and broadcast; rows outside the sample are labelled by k-NN vote. Collective over
    ``group``.

    The result is the same on any number of ranks: the sample is chosen by global index and
    sorted by it, and rank 0 sees the same pool either way. With ``align_to`` (the current
    ``[T, N]`` label bank, the same on every rank) each head's new cluster ids are permuted to
    match its old ones as well as possible (Hungarian matching on the pool): a mixture's
    component ids are arbitrary, and a head that had to relearn permuted targets would lose
    what it has learnt.
    """
    f = features.float()
    if l2_normalize:
        f = torch.nn.functional.normalize(f, dim=1)
    pool = sample_pool(f, idx, num_samples, samples, seed, group)
    old = None if align_to is None else align_to[:, global_sample(num_samples, samples, seed)[1]]
    labels = pool_labels(pool, heads, clusters, seed, neighbors, dim, restarts, candidates, old,
                         group=group, select=select)  # fmt: skip
    return extend_labels(f, idx, pool, labels, num_samples, samples, seed, clusters,
                         normalized=l2_normalize)  # fmt: skip


def pool_labels(
    pool: torch.Tensor,
    heads: int,
    clusters: int,
    seed: int,
    neighbors: int = UMAP_NEIGHBORS,
    dim: int = 10,
    restarts: int = 3,
    candidates: int = 1,
    align_to: torch.Tensor | None = None,
    *,
    group: C.Group,
    select: Select = "silhouette",
) -> torch.Tensor:
    """Labels ``[T, P]`` of the global sample ``pool`` (the same on every rank): one UMAP +
    GMM partition per head (seeds seed..seed+T−1) on rank 0, broadcast over ``group`` (a
    collective). ``align_to`` ``[T, P]``: the pool's current labels, whose ids the new ones are
    matched to."""
    labels = torch.zeros(heads, len(pool), dtype=torch.int64)
    if C.rank(group) == 0:
        x = np.ascontiguousarray(pool.cpu().numpy())
        for t in range(heads):
            new = cluster_pool(x, clusters, seed + t, neighbors, dim, restarts, candidates, select)
            if align_to is not None:
                new = match_ids(new, align_to[t].numpy(), clusters)
            labels[t] = torch.from_numpy(new)
    return C.broadcast(labels, 0, group)


def extend_labels(
    features: torch.Tensor,
    idx: torch.Tensor,
    pool: torch.Tensor,
    labels: torch.Tensor,
    num_samples: int,
    samples: int,
    seed: int,
    clusters: int,
    normalized: bool = False,
) -> torch.Tensor:
    """This rank's labels ``[T, n_r]`` from the pool's ``[T, P]``: rows in the global sample
    take theirs, the others a vote of their nearest pool rows by cosine similarity
    (``normalized``: rows and pool are unit vectors already)."""
    in_pool, pool_idx = global_sample(num_samples, samples, seed)
    mine = in_pool[idx]
    where = torch.searchsorted(pool_idx, idx[mine])
    out = torch.empty(labels.shape[0], len(idx), dtype=torch.int64)
    rest = features[(~mine).to(features.device)]
    if not normalized:
        pool = torch.nn.functional.normalize(pool, dim=1)
        rest = torch.nn.functional.normalize(rest, dim=1)
    out[:, mine] = labels[:, where]
    out[:, ~mine] = vote(pool, labels, rest, clusters)
    return out
