r"""DEC, DEPICT and DGG as :class:`~selfclust.methods.base.Method`\ s: losses per phase,
initialisation, refreshes.

:class:`selfclust.train.loop.Trainer` owns data, optimisers, checkpoints and the schedule; a
:class:`MethodRunner` owns what one method keeps between label passes (docs/methods.md):

* DEC: the soft frequencies ``f`` [K] and the stop rule;
* DEPICT: the column sums ``s`` [K] and whether targets are still the k-means labels;
* DGG: the neighbour table and weights ``[N, k]`` (on every rank, like the label bank) and
  this rank's refresh-time posteriors of its own label-pass rows (never gathered);
* all three: the *teacher*, a copy of the network as of the last refresh. Targets (DEC's p,
  DEPICT's q) are functions of that network and one K-vector, so any rank recomputes the
  target of any sample it trains on, and nothing N × K is ever stored or gathered.

All global statistics go through the components' collectives (one all-reduce of K floats,
the GMM statistics, the exact k-NN graph), so the initialisation does not depend on the
number of ranks.
"""

from __future__ import annotations

import copy
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from selfclust import collectives as C
from selfclust.config import DepictMethod, PretrainedMethod, RunConfig, expect
from selfclust.data.streams import Batches
from selfclust.labels.bank import LabelBank
from selfclust.labels.kmeans import assign
from selfclust.labels.label_pass import Embedded, embed
from selfclust.labels.manifold import extend_labels, pool_labels
from selfclust.labels.sample import sample_pool
from selfclust.methods import dec
from selfclust.methods.base import LabelUpdate, Method
from selfclust.methods.nets import ClusterNet
from selfclust.seeds import step_seed

Losses = dict[str, torch.Tensor]  # "loss" (the total) and named terms
M = TypeVar("M", bound=PretrainedMethod)


def fit_head(
    head: nn.Module,
    pool: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    centroids: torch.Tensor | None = None,
    *,
    group: C.Group,
) -> float:
    """Fit a softmax head to k-means labels (full-batch Adam on the global pool, identical on
    every rank); rank 0's result is broadcast over ``group`` (a collective) so all ranks hold
    the same bits. Returns the final cross-entropy.

    With ``centroids`` (a linear head) the head starts as ``softmax(−‖z − c_k‖² / τ)``, τ the
    mean squared distance of the pool to its nearest centroid: its argmax is the k-means
    partition from the first step, so Adam only sharpens it (from a random head, a small-scale
    embedding needs many steps to reach confident predictions).

    The fit runs on the head's device: the pool and labels (CPU tensors from
    :func:`~selfclust.labels.sample.sample_pool`) are copied there once."""
    dev = next(head.parameters()).device
    pool, labels = pool.to(dev), labels.to(dev)
    if centroids is not None and isinstance(head, nn.Linear):
        c = centroids.to(pool)
        tau = float(dec.squared_distances(pool, c).min(1).values.mean().clamp_min(1e-12))
        with torch.no_grad():
            head.weight.copy_(2.0 * c / tau)
            head.bias.copy_(-c.square().sum(1) / tau)
    loss = torch.zeros((), device=dev)
    if steps:
        opt = torch.optim.Adam(head.parameters(), 1e-2)
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.cross_entropy(head(pool), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    with torch.no_grad():
        for p in head.parameters():
            C.broadcast(p.data, 0, group)
    return float(loss.detach())


class MethodRunner(Method, Generic[M]):
    """Shared machinery; one subclass per method, reading its ``method`` section ``config``.

    Targets (DEC's p, DEPICT's q) come from the teacher, the network as of the last refresh,
    as the papers do."""

    config: type[M]

    terms: tuple[str, ...] = ("reconstruction",)
    phases = ("pretrain", "cluster")

    def __init__(
        self,
        cfg: RunConfig,
        model: ClusterNet,
        num_samples: int,
        device: torch.device | None = None,
        image_size: int | None = None,
        rank: int = 0,
    ) -> None:
        self.cfg, self.model, self.n = cfg, model, num_samples
        self.device, self.size, self.rank = device or torch.device("cpu"), image_size, rank
        self.m: M = expect(cfg.method, self.config)
        self.name = self.m.name
        self.pretrain_epochs = self.m.pretrain_epochs
        self.teacher = copy.deepcopy(model).requires_grad_(False).eval()

    # ------------------------------------------------------------------ the loop's interface
    def batch_losses(
        self,
        images: torch.Tensor,
        idx: torch.Tensor,
        aug: torch.Tensor | None = None,  # unused: these methods draw their own
        *,
        phase: str,
        epoch: int,
        step: int,
        bank: LabelBank,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the total and ``[total, *terms]`` (detached)."""
        # Dropout noise and DGG's z samples from a per-(step, rank) seed: exact on resume.
        torch.manual_seed(step_seed(self.cfg.seed, step, self.rank))
        images = images.to(self.device, non_blocking=True)
        x = self.model.inputs(images, self.size)
        if phase == "pretrain":
            out = self.pretrain_loss(x)
        else:
            labels = bank.lookup(idx)[0].to(self.device, non_blocking=True)
            noisy = None
            if isinstance(self.m, DepictMethod) and self.m.noise_augment:  # the noisy path
                cfg = self.cfg
                noisy = self.model.augmented_inputs(
                    images, idx, cfg.augment, cfg.seed, epoch, self.size
                )
            out = self.cluster_loss(x, idx, labels, noisy)
        zero = torch.zeros((), device=x.device)
        logged = torch.stack([out["loss"].detach(), *(out.get(t, zero) for t in self.terms)])
        return out["loss"], logged

    def embed(self, batches: Batches, num_samples: int, initial: bool) -> Embedded:
        """The method's embedding of its own input pixels."""
        return embed(self.model.features, batches, self.device, self.size, num_samples,
                     group=C.WORLD, transform=self.model.inputs)  # fmt: skip

    def first_labels(self, emb: Embedded, bank: LabelBank) -> LabelUpdate:
        local, extra = self.initialise(emb)
        return local, {"event": f"init_{self.m.cluster_init}", **extra}

    def update_labels(
        self, emb: Embedded, bank: LabelBank, step: int, manifold: bool
    ) -> LabelUpdate:
        seed = self.cfg.seed + step if manifold else None
        local, extra = self.refresh(emb, manifold_seed=seed)
        return local, {"event": "relabel", **extra}

    def summary(self) -> dict[str, Any]:
        return {"pretrain_epochs": self.pretrain_epochs, "stopped_early": self.stopped}

    def rebuild(self, batches: Batches, num_samples: int) -> None:
        # per-rank state is not checkpointed: rebuilt from the saved teacher
        self.resume(embed(self.teacher.features, batches, self.device, self.size, num_samples,
                          group=C.WORLD, transform=self.model.inputs))  # fmt: skip

    # ------------------------------------------------------------------ phases
    def pretrain_loss(self, x: torch.Tensor) -> Losses:
        raise NotImplementedError

    def cluster_loss(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        labels: torch.Tensor,
        noisy: torch.Tensor | None = None,
    ) -> Losses:
        """Clustering-phase loss of a batch; ``noisy`` is DEPICT's augmented noisy-path input
        (``method.noise_augment``), None otherwise."""
        raise NotImplementedError

    # ------------------------------------------------------------------ label passes
    def _partition(
        self, emb: Embedded
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first partition of the pretrained embedding (any rank count): centroids
        ``[K, d]``, the global sample ``pool``, its labels, and this rank's labels.

        ``cluster_init=kmeans`` (the papers'): best-of-restarts k-means, labels by nearest
        centroid. ``cluster_init=manifold``: UMAP + a Gaussian mixture on the same sample
        (:mod:`selfclust.labels.manifold`; the other
        rows by k-NN vote), centroids the clusters' means
        over every rank's rows (one all-reduce of K × d sums and K counts).

        The centroids are on the embedding's device; the pool and the labels on the CPU."""
        m = self.m
        f = emb.features.float()
        pool = sample_pool(f, emb.idx, self.n, m.kmeans_samples, self.cfg.seed, C.WORLD)
        if m.cluster_init == "kmeans":
            mu = dec.best_centroids(
                pool, m.clusters, m.kmeans_restarts, self.cfg.seed, group=C.WORLD
            )
            return mu.to(f.device), pool, assign(pool.cpu(), mu.cpu()), assign(f.cpu(), mu.cpu())
        labels = pool_labels(pool, 1, m.clusters, self.cfg.seed, m.manifold_neighbors,
                             candidates=m.manifold_init_candidates, group=C.WORLD)  # fmt: skip
        own = extend_labels(f, emb.idx, pool, labels, self.n, m.kmeans_samples, self.cfg.seed,
                            m.clusters)[0]  # fmt: skip
        sums = torch.zeros(m.clusters, f.shape[1], dtype=torch.float64)
        sums.index_add_(0, own, f.cpu().double())
        counts = torch.bincount(own, minlength=m.clusters).double()
        sums, counts = C.all_reduce_sum(sums), C.all_reduce_sum(counts)
        mu = (sums / counts.clamp_min(1)[:, None]).float().to(f.device)
        return mu, pool, labels[0], own

    def _snapshot(self) -> None:
        self.teacher.load_state_dict(self.model.state_dict())

    def _on_model(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the model's device: what a step or a refresh reads beside the network (a
        target's K-vector goes there once per refresh, not once per step)."""
        return t.to(next(self.model.parameters()).device)

    def initialise(self, emb: Embedded) -> tuple[torch.Tensor, dict[str, Any]]:
        """Phase 1: set the clustering part of the network from k-means on ``emb``; returns
        this rank's labels ``[1, n_r]`` for the bank and a metrics record."""
        raise NotImplementedError

    def refresh(
        self, emb: Embedded, manifold_seed: int | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """A scheduled target refresh from a label pass of the current network. With
        ``manifold_seed`` (one of the last ``method.manifold_relabels``; DEPICT only) the
        targets are a UMAP + GMM partition of the embedding, seeded so."""
        raise NotImplementedError

    def resume(self, emb: Embedded) -> None:
        """Rebuild per-rank state that checkpoints do not hold, from a teacher label pass."""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"teacher": {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
