"""The trainer's side of DEC, DEPICT and DGG: losses per phase, initialisation, refreshes.

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfclust import collectives as C
from selfclust.config import RunConfig
from selfclust.labels.kmeans import assign, sample_pool
from selfclust.labels.label_pass import Embedded
from selfclust.labels.manifold import extend_labels, pool_labels
from selfclust.methods import dec, depict, dgg, graph
from selfclust.methods.autoencoder import denoising_loss
from selfclust.methods.nets import ClusterNet, DECModel, DEPICTModel, DGGModel

Losses = dict[str, torch.Tensor]  # "loss" (the total) and named terms


def fit_head(
    head: nn.Module,
    pool: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    centroids: torch.Tensor | None = None,
) -> float:
    """Fit a softmax head to k-means labels (full-batch Adam on the global pool, identical on
    every rank); rank 0's result is broadcast so all ranks hold the same bits. Returns the
    final cross-entropy.

    With ``centroids`` (a linear head) the head starts as ``softmax(−‖z − c_k‖² / τ)``, τ the
    mean squared distance of the pool to its nearest centroid: its argmax is the k-means
    partition from the first step, so Adam only sharpens it (from a random head, a small-scale
    embedding needs many steps to reach confident predictions)."""
    if centroids is not None and isinstance(head, nn.Linear):
        c = centroids.to(pool)
        tau = float(dec.squared_distances(pool, c).min(1).values.mean().clamp_min(1e-12))
        with torch.no_grad():
            head.weight.copy_(2.0 * c / tau)
            head.bias.copy_(-c.square().sum(1) / tau)
    loss = torch.zeros(())
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
            C.broadcast(p.data, 0)
    return float(loss.detach())


class MethodRunner:
    """Shared machinery; one subclass per method."""

    terms: tuple[str, ...] = ("reconstruction",)

    def __init__(self, cfg: RunConfig, model: ClusterNet, num_samples: int) -> None:
        self.cfg, self.model, self.n = cfg, model, num_samples
        self.m = cfg.method
        self.teacher = copy.deepcopy(model).requires_grad_(False).eval()

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
        over every rank's rows (one all-reduce of K × d sums and K counts)."""
        m = self.m
        f = emb.features.float()
        pool = sample_pool(f, emb.idx, self.n, m.kmeans_samples, self.cfg.seed, C.WORLD)
        if m.cluster_init == "kmeans":
            mu = dec.best_centroids(pool, m.clusters, m.kmeans_restarts, self.cfg.seed,
                                    m.kmeans_iters, seeding=m.kmeans_seeding,
                                    tol=m.kmeans_tol)  # fmt: skip
            return mu, pool, assign(pool.cpu(), mu.cpu()), assign(f.cpu(), mu.cpu())
        labels = pool_labels(pool, 1, m.clusters, self.cfg.seed, m.manifold_neighbors,
                             m.manifold_dim, m.manifold_restarts, m.manifold_init_candidates,
                             select=m.manifold_init_select)  # fmt: skip
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

    def after_change(self, change: float, initial: bool) -> dict[str, Any]:
        """The fraction of bank labels changed by this pass (the same on every rank)."""
        return {}

    @property
    def stopped(self) -> bool:
        return False

    def resume(self, emb: Embedded) -> None:
        """Rebuild per-rank state that checkpoints do not hold, from a teacher label pass."""

    @property
    def needs_resume_pass(self) -> bool:
        return False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"teacher": {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])


class DECRunner(MethodRunner):
    terms = ("reconstruction", "kl")

    def __init__(self, cfg: RunConfig, model: ClusterNet, num_samples: int) -> None:
        super().__init__(cfg, model, num_samples)
        self.f = torch.ones(cfg.method.clusters, dtype=torch.float64)
        self.stop = dec.StopRule(cfg.method.stop_tol)

    def pretrain_loss(self, x: torch.Tensor) -> Losses:
        net = self._net(self.model)
        loss, _ = denoising_loss(net.ae, x, self.m.pretrain_dropout)
        return {"loss": loss, "reconstruction": loss.detach()}

    @staticmethod
    def _net(model: ClusterNet) -> dec.DECNet:
        assert isinstance(model, DECModel)
        return model.net

    def cluster_loss(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        labels: torch.Tensor,
        noisy: torch.Tensor | None = None,
    ) -> Losses:
        net = self._net(self.model)
        log_q = net.clustering(net.ae.encode(x))
        if self.m.target == "snapshot":
            with torch.no_grad():
                t = self._net(self.teacher)
                source = t.clustering(t.ae.encode(x))
        else:
            source = log_q.detach()
        log_p = dec.target_log_p(source, self.f.to(x.device))
        kl = dec.kl_loss(log_p, log_q)
        return {"loss": kl, "kl": kl.detach()}

    def initialise(self, emb: Embedded) -> tuple[torch.Tensor, dict[str, Any]]:
        mu, _, _, _ = self._partition(emb)
        with torch.no_grad():
            self._net(self.model).clustering.centroids.copy_(mu)
        return self.refresh(emb)

    def refresh(
        self, emb: Embedded, manifold_seed: int | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        with torch.no_grad():
            log_q = self.model.scores(emb.features.float())
        self.f = dec.soft_frequencies(log_q.exp()).cpu()
        self._snapshot()
        share = self.f / self.f.sum()
        record = {"f_min": float(share.min()), "f_max": float(share.max())}
        return log_q.argmax(1).cpu()[None], record

    def after_change(self, change: float, initial: bool) -> dict[str, Any]:
        if initial or not self.stop.tol:
            return {}
        self.stop.update(change)
        return {"stop_rule_change": change, "stopped": self.stop.stopped}

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "f": self.f.clone(), "stop": self.stop.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.f = state["f"].clone()
        self.stop.load_state_dict(state["stop"])


class DEPICTRunner(MethodRunner):
    terms = ("reconstruction", "ce")

    def __init__(self, cfg: RunConfig, model: ClusterNet, num_samples: int) -> None:
        super().__init__(cfg, model, num_samples)
        self.s = torch.ones(cfg.method.clusters, dtype=torch.float64)
        self.hard = True  # targets = the k-means labels until the first refresh

    @staticmethod
    def _net(model: ClusterNet) -> depict.DEPICTNet:
        assert isinstance(model, DEPICTModel)
        return model.net

    def pretrain_loss(self, x: torch.Tensor) -> Losses:
        net = self._net(self.model)
        net.ae.dropout = self.m.pretrain_dropout
        out = net(x)
        zeros = torch.zeros_like(out.noisy_logits)
        rec = depict.depict_loss(out, zeros, self.m.recon_hidden_weight).reconstruction
        return {"loss": rec, "reconstruction": rec.detach()}

    def cluster_loss(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        labels: torch.Tensor,
        noisy: torch.Tensor | None = None,
    ) -> Losses:
        net = self._net(self.model)
        net.ae.dropout = self.m.noise_dropout
        out = net(x, noisy)
        if self.hard:
            target = F.one_hot(labels, self.m.clusters).double()
        else:
            if self.m.target == "snapshot":
                with torch.no_grad():
                    logits = self._net(self.teacher).clean_logits(x)
            else:
                logits = out.clean_logits.detach()
            p = torch.softmax(logits.float(), 1)
            target = depict.balanced_target(p, self.s.to(x.device), self.m.target_power)
        loss = depict.depict_loss(out, target, self.m.recon_hidden_weight)
        return {
            "loss": loss.total,
            "reconstruction": loss.reconstruction.detach(),
            "ce": loss.clustering.detach(),
        }

    def _stats(self, emb: Embedded) -> torch.Tensor:
        with torch.no_grad():
            p = torch.softmax(self.model.scores(emb.features.float()), 1)
        self.s = depict.column_sums(p).cpu()
        self._snapshot()
        return p

    def initialise(self, emb: Embedded) -> tuple[torch.Tensor, dict[str, Any]]:
        mu, pool, pool_labels, own = self._partition(emb)
        ce = fit_head(self._net(self.model).head, pool, pool_labels, self.m.head_fit_steps,
                      centroids=mu)  # fmt: skip
        self._stats(emb)
        self.hard = True
        return own[None], {"head_fit_ce": ce}

    def refresh(
        self, emb: Embedded, manifold_seed: int | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Balanced soft targets from the new snapshot (``balanced_target``); or, with
        ``manifold_seed``, one-hot targets: the UMAP + GMM partition of the current embedding,
        its cluster ids matched to the head's argmax (Hungarian, on the global sample) so that
        the head keeps what it has learnt. The joint phase sharpens the embedding more than
        the linear head shows (on MNIST-test, seed 1: the embedding's partition at ACC 0.961
        under a head at 0.953); one-hot targets carry that partition into the head. The
        targets are the label bank's, so a resumed run trains on the same ones."""
        p = self._stats(emb)
        if manifold_seed is None:
            self.hard = False
            return p.argmax(1).cpu()[None], {}
        m = self.m
        f = emb.features.float()
        pool = sample_pool(f, emb.idx, self.n, m.kmeans_samples, manifold_seed, C.WORLD)
        with torch.no_grad():
            current = self.model.scores(pool).argmax(1).cpu()
        seed, k = manifold_seed, m.clusters
        labels = pool_labels(pool, 1, k, seed, m.manifold_neighbors, m.manifold_dim,
                             m.manifold_restarts, align_to=current[None])  # fmt: skip
        own = extend_labels(f, emb.idx, pool, labels, self.n, m.kmeans_samples, seed, k)[0]
        self.hard = True
        agree = float((labels[0] == current).double().mean())
        return own[None], {"labeller": "manifold", "manifold_head_agreement": agree}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "s": self.s.clone(), "hard": self.hard}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.s = state["s"].clone()
        self.hard = bool(state["hard"])


class DGGRunner(MethodRunner):
    terms = ("reconstruction", "elbo", "graph", "fetch_missing")

    def __init__(self, cfg: RunConfig, model: ClusterNet, num_samples: int) -> None:
        super().__init__(cfg, model, num_samples)
        k = cfg.method.knn_k
        self.neighbours = torch.zeros(num_samples, k, dtype=torch.int64)
        self.weights = torch.zeros(num_samples, k)
        self.owned_idx = torch.zeros(0, dtype=torch.int64)
        self.owned_rows = torch.zeros(0, cfg.method.clusters)

    @staticmethod
    def _model(model: ClusterNet) -> DGGModel:
        assert isinstance(model, DGGModel)
        return model

    def pretrain_loss(self, x: torch.Tensor) -> Losses:
        net = self._model(self.model).net
        rec = F.mse_loss(net.decoder(net.encode(x)[0]), x.flatten(1))
        return {"loss": rec, "reconstruction": rec.detach()}

    def cluster_loss(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        labels: torch.Tensor,
        noisy: torch.Tensor | None = None,
    ) -> Losses:
        model = self._model(self.model)
        out = model.net(x)
        log_gamma = F.log_softmax(out.posterior_logits.float(), 1)
        b, k = len(idx), self.m.knn_k
        nb, found = graph.fetch_rows(self.neighbours[idx.cpu()].flatten(), self.owned_idx,
                                     self.owned_rows)  # fmt: skip
        w = (self.weights[idx.cpu()] * found.view(b, k).float()).to(x.device)
        elbo = dgg.neg_elbo(x, out, log_gamma, model.prior).mean() / x[0].numel()
        g = graph.graph_loss(log_gamma.exp(), nb.view(b, k, -1).to(x.device), w)
        missing = (~found).float().mean()
        return {
            "loss": elbo + self.m.graph_weight * g,
            "elbo": elbo.detach(),
            "graph": g.detach(),
            "fetch_missing": missing,
        }

    def _own_rows(self, model: ClusterNet, emb: Embedded) -> torch.Tensor:
        with torch.no_grad():
            post = torch.softmax(model.scores(emb.features.float()), 1).cpu()
        order = torch.argsort(emb.idx)
        self.owned_idx, self.owned_rows = emb.idx[order].clone(), post[order].contiguous()
        return post

    def initialise(self, emb: Embedded) -> tuple[torch.Tensor, dict[str, Any]]:
        m = self.m
        model = self._model(self.model)
        _, pool, pool_labels, own = self._partition(emb)
        z = emb.features.float()
        model.prior.load_statistics(dgg.gmm_statistics(z, F.one_hot(own, m.clusters).to(z)))
        ce = fit_head(model.net.classifier, pool, pool_labels, m.head_fit_steps)
        knn = graph.knn_graph(z, emb.idx, m.knn_k)
        w = graph.similarity_weights(knn.sq_distances, m.sigma_rank)
        # The table goes to every rank like the label bank: N × k, never N × K.
        rows = C.all_gather_cat(torch.cat([emb.idx[:, None].cpu(), knn.neighbours], 1))
        weights = C.all_gather_cat(w.float().contiguous())
        self.neighbours[rows[:, 0]] = rows[:, 1:]
        self.weights[rows[:, 0]] = weights
        labels, record = self.refresh(emb)
        return labels, {**record, "head_fit_ce": ce, "knn_weight_mean": float(weights.mean())}

    def refresh(
        self, emb: Embedded, manifold_seed: int | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        post = self._own_rows(self.model, emb)
        self._snapshot()
        return post.argmax(1)[None], {}

    @property
    def needs_resume_pass(self) -> bool:
        return True

    def resume(self, emb: Embedded) -> None:
        self._own_rows(self.teacher, emb)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "neighbours": self.neighbours.clone(),
            "weights": self.weights.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.neighbours = state["neighbours"].clone()
        self.weights = state["weights"].clone()


def build_runner(cfg: RunConfig, model: ClusterNet, num_samples: int) -> MethodRunner:
    runners: dict[str, type[MethodRunner]] = {
        "dec": DECRunner,
        "depict": DEPICTRunner,
        "dgg": DGGRunner,
    }
    return runners[cfg.method.name](cfg, model, num_samples)
