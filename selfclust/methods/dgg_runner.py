"""DGG's side of training (:class:`MethodRunner`): the k-NN table and weights ``[N, k]`` (on
every rank, like the label bank) and this rank's refresh-time posteriors of its own rows;
the formulas are :mod:`selfclust.methods.dgg`'s and :mod:`selfclust.methods.graph`'s."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from selfclust import collectives as C
from selfclust.config import DggMethod, RunConfig
from selfclust.labels.label_pass import Embedded
from selfclust.methods import dgg, graph
from selfclust.methods.nets import ClusterNet, DGGModel
from selfclust.methods.runner import Losses, MethodRunner, fit_head


class DGGRunner(MethodRunner[DggMethod]):
    config = DggMethod
    terms = ("reconstruction", "elbo", "graph", "fetch_missing")

    def __init__(self, cfg: RunConfig, model: ClusterNet, num_samples: int, **on: Any) -> None:
        super().__init__(cfg, model, num_samples, **on)
        k = self.m.knn_k
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
        b, k, clusters = len(idx), self.m.knn_k, self.m.clusters
        # The graph lives on the CPU (the tables, fetch_rows' gloo collectives): one copy of
        # the step's block [b·k, K + 2] (neighbour posteriors, weight, missing) to the device.
        nb, found = graph.fetch_rows(self.neighbours[idx.cpu()].flatten(), self.owned_idx,
                                     self.owned_rows, C.WORLD)  # fmt: skip
        w = self.weights[idx.cpu()].flatten() * found.float()
        block = torch.cat([nb, w[:, None], (~found).float()[:, None]], 1).to(x.device)
        # the inputs are unit pixels (DggMethod.pixels): no range check, which would sync
        elbo = dgg.neg_elbo(x, out, log_gamma, model.prior, check_range=False).mean()
        elbo = elbo / x[0].numel()
        nb, w = block[:, :clusters].view(b, k, clusters), block[:, clusters].view(b, k)
        g = graph.graph_loss(log_gamma.exp(), nb, w)
        missing = block[:, clusters + 1].mean()
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
        gamma = F.one_hot(own, m.clusters).to(z)
        model.prior.load_statistics(dgg.gmm_statistics(z, gamma, C.WORLD))
        ce = fit_head(model.net.classifier, pool, pool_labels, m.head_fit_steps, group=C.WORLD)
        knn = graph.knn_graph(z, emb.idx, m.knn_k, C.WORLD)
        w = graph.similarity_weights(knn.sq_distances)
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
