"""DEC's side of training (:class:`MethodRunner`): the soft frequencies ``f`` [K], the
teacher snapshot and the stop rule; the formulas are :mod:`selfclust.methods.dec`'s."""

from __future__ import annotations

from typing import Any

import torch

from selfclust import collectives as C
from selfclust.config import DecMethod, RunConfig
from selfclust.labels.label_pass import Embedded
from selfclust.methods import dec
from selfclust.methods.autoencoder import denoising_loss
from selfclust.methods.nets import ClusterNet, DECModel
from selfclust.methods.runner import Losses, MethodRunner


class DECRunner(MethodRunner[DecMethod]):
    config = DecMethod
    terms = ("reconstruction", "kl")

    def __init__(self, cfg: RunConfig, model: ClusterNet, num_samples: int, **on: Any) -> None:
        super().__init__(cfg, model, num_samples, **on)
        self._set_f(torch.ones(cfg.method.clusters, dtype=torch.float64))
        self.stop = dec.StopRule(self.m.stop_tol)

    def _set_f(self, f: torch.Tensor) -> None:
        """The global frequencies [K] float64: ``f`` on the CPU (state, records) and, checked
        once here, ``f_step`` on the model's device for the steps."""
        self.f = dec.check_frequencies(f, self.m.clusters)
        self.f_step = self._on_model(f)

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
        with torch.no_grad():
            t = self._net(self.teacher)
            source = t.clustering(t.ae.encode(x))
        log_p = dec.target_log_p(source, self.f_step, checked=True)
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
        self._set_f(dec.soft_frequencies(log_q.exp(), C.WORLD).cpu())
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
        self._set_f(state["f"].clone())
        self.stop.load_state_dict(state["stop"])
