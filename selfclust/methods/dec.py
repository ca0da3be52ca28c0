"""DEC (Xie, Girshick, Farhadi, ICML 2016): Student-t assignment, sharpened target, KL loss.

Notation follows the paper: embeddings ``z_i = f_θ(x_i)``, centroids ``μ_j``,

    q_ij ∝ (1 + ‖z_i − μ_j‖² / α)^(−(α+1)/2)          soft assignment (eq. 1), α = 1
    p_ij ∝ q_ij² / f_j,   f_j = Σ_i q_ij             target (eq. 3), f over the WHOLE dataset
    L = KL(P ‖ Q) = Σ_i Σ_j p_ij log(p_ij / q_ij)     loss (eq. 2)

Distributed: ``f`` is the only global statistic. Each rank sums the rows it holds and one
all-reduce of a K-vector (float64) makes it global; q and p are never gathered. The stopping
rule compares argmax assignments between two target refreshes with one all-reduce of two
counts. Everything is computed in log space, so a far-away centroid gives a tiny q, never 0/0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selfclust import collectives as C
from selfclust.labels.kmeans import (
    LLOYD_ITERS,
    Seeding,
    distributed_centroids,
    objective,
)
from selfclust.methods.autoencoder import MLPAutoencoder


def squared_distances(z: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``‖z_i − μ_j‖²`` ``[n, K]`` as ``‖z‖² − 2 z·μ + ‖μ‖²`` (one matmul, no [n, K, d] block),
    clamped at 0 against cancellation."""
    d2 = z.square().sum(1, keepdim=True) - 2.0 * z @ mu.t() + mu.square().sum(1)[None, :]
    return d2.clamp_min(0.0)


def student_t_log_q(z: torch.Tensor, mu: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``log q_ij`` ``[n, K]`` of eq. 1 (rows sum to 1 in probability space)."""
    if alpha <= 0:
        raise ValueError(f"Student-t degrees of freedom must be > 0, got alpha={alpha}")
    if z.shape[1] != mu.shape[1]:
        raise ValueError(f"embeddings are {z.shape[1]}-d but centroids {mu.shape[1]}-d")
    log_kernel = -(alpha + 1.0) / 2.0 * torch.log1p(squared_distances(z, mu) / alpha)
    return log_kernel - torch.logsumexp(log_kernel, dim=1, keepdim=True)


def soft_frequencies(q: torch.Tensor, group: C.Group) -> torch.Tensor:
    """``f_j = Σ_i q_ij`` over the rows of every rank of ``group``: ``[K]`` float64; a
    collective (one all-reduce)."""
    return C.all_reduce_sum(q.detach().double().sum(0), group)


def check_frequencies(f: torch.Tensor, clusters: int) -> torch.Tensor:
    """``f`` if it is a positive ``[K]`` vector, else a ValueError. Reads f's values: off the
    CPU a host–device sync, so a training step checks f once per refresh, where it is set."""
    if f.shape != (clusters,) or not bool((f > 0).all()):
        raise ValueError(f"f must be a positive [{clusters}] vector, got {tuple(f.shape)}")
    return f


def target_log_p(log_q: torch.Tensor, f: torch.Tensor, *, checked: bool = False) -> torch.Tensor:
    """``log p_ij`` ``[n, K]`` of eq. 3 from this rank's ``log q`` and the global ``f`` [K].

    Computed in float64 (the squaring doubles the dynamic range of q) and detached: the target
    is a constant for the loss, as in DEC's alternating scheme. ``checked``: ``f`` passed
    :func:`check_frequencies` already (then only its shape is checked here: no sync).
    """
    if not checked:
        check_frequencies(f, log_q.shape[1])
    elif f.shape != (log_q.shape[1],):
        raise ValueError(f"f must be a positive [{log_q.shape[1]}] vector, got {tuple(f.shape)}")
    s = 2.0 * log_q.detach().double() - f.double().log()[None, :]
    return s - torch.logsumexp(s, dim=1, keepdim=True)


def kl_loss(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(P ‖ Q)`` of eq. 2 averaged over the batch rows (the paper sums; the mean keeps the
    step size independent of the batch size). Gradients flow through ``log_q`` only."""
    p = log_p.exp().to(log_q.dtype)
    return (p * (log_p.to(log_q.dtype) - log_q)).sum(1).mean()


@dataclass
class StopRule:
    """DEC's convergence test: stop once fewer than ``tol`` (a fraction: DEC's tol = 0.1 % is
    0.001) of the assignments change between two consecutive target refreshes."""

    tol: float = 0.001
    last_change: float | None = None
    stopped: bool = False

    def update(self, change: float) -> bool:
        """Record the change measured at a refresh; returns whether training should stop."""
        self.last_change = change
        self.stopped = self.stopped or change < self.tol
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        return {"tol": self.tol, "last_change": self.last_change, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tol = float(state["tol"])
        self.last_change = state["last_change"]
        self.stopped = bool(state["stopped"])


class ClusteringLayer(nn.Module):
    """The learnable centroids ``μ`` ``[K, d]``; ``layer(z)`` returns ``log q`` ``[B, K]``."""

    def __init__(self, clusters: int, embed_dim: int, alpha: float = 1.0) -> None:
        super().__init__()
        if clusters < 2:
            raise ValueError(f"DEC needs at least 2 clusters, got {clusters}")
        self.alpha = alpha
        self.centroids = nn.Parameter(torch.zeros(clusters, embed_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return student_t_log_q(z, self.centroids, self.alpha)


@dataclass
class DECOutput:
    embedding: torch.Tensor  # [B, d_z]
    reconstruction: torch.Tensor  # [B, d] (the pretraining phase's target is the input)
    log_q: torch.Tensor  # [B, K] Student-t soft assignment


class DECNet(nn.Module):
    """Autoencoder + clustering layer: one forward (one DDP call) serves both of DEC's phases,
    the pretraining loss reads ``reconstruction``, the clustering loss ``log_q``."""

    def __init__(self, autoencoder: MLPAutoencoder, clusters: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.ae = autoencoder
        self.clustering = ClusteringLayer(clusters, autoencoder.embed_dim, alpha)

    def forward(self, x: torch.Tensor) -> DECOutput:
        out = self.ae(x)
        return DECOutput(out.embedding, out.reconstruction, self.clustering(out.embedding))


def best_centroids(
    pool: torch.Tensor,
    clusters: int,
    restarts: int,
    seed: int,
    niter: int = LLOYD_ITERS,
    *,
    group: C.Group,
    seeding: Seeding = "random",
    tol: float = 0.0,
) -> torch.Tensor:
    """The best of ``restarts`` k-means runs on ``pool`` (the same on every rank) by objective:
    ``[K, d]``. Collective over ``group``: rank 0 runs faiss and broadcasts the runs; every
    rank scores them."""
    runs = distributed_centroids(
        pool, restarts, clusters, seed, niter, pool.device, group, seeding=seeding, tol=tol
    )
    scores = [objective(pool, runs[r]) for r in range(restarts)]
    return runs[min(range(restarts), key=scores.__getitem__)].clone()
