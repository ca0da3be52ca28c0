"""k-means for initial labels: faiss on the CPU, torch on the GPU (or the CPU).

Distributed use (:func:`distributed_centroids`): every rank contributes the rows of a sample
chosen by *global* index (so the pool is the same whatever the number of ranks, and a rank
sends at most its share of it), rank 0 clusters the pool (sorted by idx, hence deterministic),
and the centroids are broadcast; each rank then assigns its own rows (:func:`assign`).

Backends (:func:`choose_backend`): CUDA input is clustered by ``torch`` on its own device.
faiss-gpu's ``Kmeans(gpu=True)`` would spread over every GPU the process sees (Ray shares a
node's ``CUDA_VISIBLE_DEVICES`` among its workers, so rank 0 would put a CUDA context and
temporary memory on the GPUs the other ranks train on), and it loads a CUDA 12 runtime beside
PyPI torch's CUDA 13. ``faiss`` is the CPU backend (``backend="faiss"`` on CUDA input clusters
a CPU copy); ``torch`` works on the CPU too, which is how the tests check it.
faiss subsamples to ``k * max_points_per_centroid`` points by default; we lift that limit,
the caller bounds the pool instead. Never call this in a forked DataLoader worker: libgomp
is not fork-safe after faiss has run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from selfclust import collectives as C

Backend = Literal["auto", "faiss", "torch"]
# Starting centroids: k distinct random points; k-means++ (D² sampling, Arthur & Vassilvitskii
# 2007: k passes over the data); AFK-MC² (Bachem et al. 2016: k-means++ approximated by short
# Markov chains: ~0.4 s, 1.5 Lloyd iterations' time, at 100k × 256 → 1000 against ~1.7 s for
# k-means++ on 2 cores). The torch fallback seeds both k-means++ kinds by exact D² sampling.
Seeding = Literal["random", "kmeans++", "afkmc2"]

# Every k-means selfclust runs: 25 Lloyd iterations from random points, no early stop. On 100k
# MNIST features at K = 1000 this ends within 0.5 % of sklearn's objective (k-means++, run to
# convergence) in a tenth of its time; AFK-MC² starts end at the same objective after 25
# iterations, and an early stop (tol > 0) can end a stalled small-K run 3 % high
# (docs/performance.md, k-means).
LLOYD_ITERS = 25


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [k, D] float32, CPU
    objective: float  # Σ_i min_k ||x_i − c_k||² over the training points, final centroids
    backend: str  # "faiss-cpu" or "torch-<device>"
    iterations: int  # Lloyd iterations run (fewer than niter when tol stopped them)


def _faiss() -> Any:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def faiss_gpus() -> int:
    """Number of GPUs faiss can use (0 with the faiss-cpu build); for benchmarks/kmeans.py."""
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0


def choose_backend(backend: Backend, on_gpu: bool) -> str:
    """The k-means that runs: ``"torch"`` (on the input's device) or ``"faiss-cpu"``.
    ``auto``: torch for CUDA input, faiss for CPU input. faiss never runs on a GPU here (see
    the module docstring), whichever faiss build is installed."""
    if backend == "torch" or (backend == "auto" and on_gpu):
        return "torch"
    return "faiss-cpu"


def _check_not_in_loader_worker() -> None:
    if torch.utils.data.get_worker_info() is not None:
        raise RuntimeError(
            "k-means called inside a DataLoader worker: faiss/OpenMP is not fork-safe; "
            "run it in the training process"
        )


def _check_input(x: torch.Tensor, k: int, niter: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"k-means needs a 2-D [n, D] array, got shape {tuple(x.shape)}")
    if not 2 <= k <= x.shape[0]:
        raise ValueError(f"k-means needs 2 <= k <= n points, got k={k}, n={x.shape[0]}")
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"k-means input has {bad} row(s) with NaN or inf: fix the features")


def objective(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> float:
    """Σ_i min_k ||x_i − c_k||² (float64 accumulation), computed in row chunks."""
    c = centroids.to(x.device, torch.float32)
    total = 0.0
    for xb in x.float().split(chunk):
        total += float(torch.cdist(xb, c).amin(dim=1).double().square().sum())
    return total


def kmeans_torch(
    x: torch.Tensor,
    k: int,
    niter: int = LLOYD_ITERS,
    seed: int = 0,
    chunk: int = 16384,
    init: torch.Tensor | None = None,
    seeding: Seeding = "random",
    tol: float = 0.0,
) -> tuple[torch.Tensor, list[float]]:
    """Lloyd's k-means in torch on ``x``'s device: centroids ``[k, D]`` float32 and the
    objective at each iteration's assignment step.

    Starts from ``init`` ([k, D]) if given, else from k distinct random points (as faiss does)
    or, for either k-means++ seeding, from exact D² sampling. An empty cluster takes half of
    the largest one (its centroid, nudged apart), as faiss does. Stops early, as faiss's
    ``early_stop_threshold`` does, after the first iteration that lowers the objective by less
    than ``tol`` (a fraction of it). Assignment uses ``||x||² − 2 x·c + ||c||²`` in row
    chunks: one [chunk, k] block at a time.
    """
    x = x.float()
    n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    if init is not None:
        c = init.to(x.device, torch.float32).clone()
    elif seeding == "random":
        c = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()  # [k, D]
    else:
        c = _d2_seeding(x, k, g)
    history: list[float] = []
    x_sq = x.double().square().sum(1)  # [n], for the objective
    for _ in range(niter):
        labels, total = _nearest(x, x_sq, c, chunk)
        history.append(total)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp(min=1)[:, None])
        for j in torch.nonzero(empty).flatten().tolist():  # rare: split the largest cluster
            big = int(counts.argmax())
            eps = 1.0 / 1024
            c[j], c[big] = c[big] * (1 + eps), c[big] * (1 - eps)
            counts[j] = counts[big] = counts[big] / 2
        if len(history) > 1 and history[-2] - history[-1] < tol * history[-2]:
            break
    return c, history


def _d2_seeding(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centroid a point drawn with probability ∝ its squared
    distance to the nearest centroid so far (uniform when every point sits on a centroid).
    The draws come from ``g`` on the CPU, so CPU and CUDA pick the same points (up to float
    rounding of the distances)."""
    n = len(x)
    picks = [int(torch.randint(n, (1,), generator=g))]
    d2 = (x - x[picks[0]]).square().sum(1).double()
    for _ in range(1, k):
        cum = d2.cumsum(0)
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        total = float(cum[-1])
        target = torch.full((1,), u * total, dtype=cum.dtype, device=x.device)
        j = int(torch.searchsorted(cum, target)) if total > 0 else int(u * n)
        picks.append(min(j, n - 1))
        d2 = torch.minimum(d2, (x - x[picks[-1]]).square().sum(1).double())
    return x[torch.tensor(picks, device=x.device)].clone()


def _nearest(
    x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, float]:
    """Nearest centroid per row ``[n]`` and Σ of the squared distances (``x_sq``: the rows'
    squared norms, float64)."""
    c_sq = c.square().sum(dim=1)  # [k]
    labels, total = [], torch.zeros((), dtype=torch.float64, device=x.device)
    for xb, sq in zip(x.split(chunk), x_sq.split(chunk), strict=True):
        dist, lab = torch.addmm(c_sq, xb, c.t(), alpha=-2.0).min(1)
        labels.append(lab)
        total += (dist.double() + sq).clamp(min=0).sum()
    return torch.cat(labels), float(total)


def assign_torch(x: torch.Tensor, c: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Nearest centroid per row, ``[n]`` int64, on x's device."""
    c = c.to(x.device, torch.float32)
    c_sq = c.square().sum(dim=1)  # [k]
    out = [torch.addmm(c_sq, xb.float(), c.t(), alpha=-2.0).argmin(1) for xb in x.split(chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=x.device)


def kmeans(
    x: torch.Tensor,
    k: int,
    niter: int = LLOYD_ITERS,
    seed: int = 0,
    backend: Backend = "auto",
    seeding: Seeding = "random",
    tol: float = 0.0,
) -> KMeansResult:
    """Cluster all rows of ``x`` ([n, D]) into k clusters with at most ``niter`` Lloyd
    iterations, fewer when one lowers the objective by less than the fraction ``tol``.

    ``backend``: see :func:`choose_backend` (``auto``: torch on CUDA, faiss on the CPU).
    ``seeding``: see :data:`Seeding`.
    """
    _check_not_in_loader_worker()
    _check_input(x, k, niter)
    if not 0 <= tol < 1:
        raise ValueError(f"k-means tol is a fraction of the objective in [0, 1), got {tol}")
    name = choose_backend(backend, x.device.type == "cuda")
    if name == "torch":
        c, history = kmeans_torch(x, k, niter, seed, seeding=seeding, tol=tol)
        name, iterations = f"torch-{x.device.type}", len(history)
    else:
        faiss = _faiss()
        xs = np.ascontiguousarray(x.detach().float().cpu().numpy())
        km = faiss.Kmeans(
            x.shape[1],
            k,
            niter=niter,
            seed=seed,
            gpu=False,  # True would take every GPU of the node (module docstring)
            max_points_per_centroid=x.shape[0],
            init_method=getattr(faiss, _FAISS_SEEDING[seeding]),
            early_stop_threshold=tol,
        )
        km.train(xs)
        c = torch.from_numpy(km.centroids.copy())
        iterations = len(km.obj)
    return KMeansResult(c.float().cpu(), objective(x, c), name, iterations)


_FAISS_SEEDING = {
    "random": "ClusteringInitMethod_RANDOM",
    "kmeans++": "ClusteringInitMethod_KMEANS_PLUS_PLUS",
    "afkmc2": "ClusteringInitMethod_AFK_MC2",
}


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of every row of x: faiss (exact, BLAS) on the CPU, torch on CUDA."""
    if x.device.type != "cpu":
        return assign_torch(x, centroids).cpu()
    faiss = _faiss()
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids.float().numpy()))
    _, out = index.search(np.ascontiguousarray(x.float().numpy()), 1)
    return torch.from_numpy(out[:, 0]).long()


def distributed_centroids(
    pool: torch.Tensor,
    runs: int,
    k: int,
    seed: int,
    niter: int,
    device: torch.device,
    group: C.Group,
    seeding: Seeding = "random",
    tol: float = 0.0,
) -> torch.Tensor:
    """``runs`` k-means solutions ``[runs, k, D]`` (seeds seed..seed+runs−1) computed on rank
    0 (on ``device``: GPU when there is one) and broadcast to every rank of ``group`` (a
    collective).
    ``niter``, ``seeding``, ``tol``: as :func:`kmeans`."""
    if len(pool) < k:
        raise ValueError(
            f"k-means needs at least K={k} sampled features, got {len(pool)}: raise "
            "method.kmeans_samples or lower method.clusters"
        )
    centroids = torch.zeros(runs, k, pool.shape[1])
    if C.rank(group) == 0:
        x = pool.to(device)
        for t in range(runs):
            res = kmeans(x, k, niter=niter, seed=seed + t, seeding=seeding, tol=tol)
            centroids[t] = res.centroids
    return C.broadcast(centroids, 0, group)
