"""SeLa (Asano, Rupprecht, Vedaldi, ICLR 2020): a ResNet with T heads trained by cross-entropy
on pseudo-labels that a distributed Sinkhorn-Knopp step makes equal-size over the whole data.

* Loss: ``mean_t CE(head_t(backbone(augment(x))), bank[t, idx])``, gradients by DDP.
* First labels (``method.init``): SeLa's random equal-size labels, k-means (faiss) of the
  untrained backbone's features or of raw-pixel thumbnails, or UMAP + a Gaussian mixture of
  the thumbnails.
* Label updates: Sinkhorn on each head's logits (:func:`selfclust.labels.label_pass.
  sinkhorn_labels`: logits never gathered); the last ``method.manifold_relabels`` cluster the
  backbone's features by UMAP + a Gaussian mixture instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfclust.config import RunConfig
from selfclust.data.augment import augment, normalize
from selfclust.data.streams import Batches
from selfclust.labels.bank import LabelBank
from selfclust.labels.label_pass import (
    Embedded,
    embed,
    kmeans_labels,
    random_bank,
    sinkhorn_labels,
    thumbnails,
)
from selfclust.labels.manifold import manifold_labels
from selfclust.methods.base import LabelUpdate, Method
from selfclust.models.selflabel import SelfLabelNet
from selfclust.train.step import Precision


class SeLa(Method):
    name = "sela"
    uses_ddp = True

    def __init__(
        self,
        cfg: RunConfig,
        model: SelfLabelNet,
        num_samples: int,
        device: torch.device,
        image_size: int | None,
        precision: Precision,
    ) -> None:
        self.cfg, self.model, self.n = cfg, model, num_samples
        self.device, self.size, self.precision = device, image_size, precision
        self.forward = model  # the loop wraps it in DDP (Method.forward)
        # Augment in the loader workers (per-sample OpenCV) or batched on the device.
        self.loader_augment = cfg.augment.where == "loader"

    def batch_losses(
        self,
        images: torch.Tensor,
        idx: torch.Tensor,
        *,
        phase: str,
        epoch: int,
        step: int,
        bank: LabelBank,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        images = images.to(self.device, non_blocking=True)
        if self.loader_augment:  # already cropped and jittered by the loader
            x = normalize(images)
        else:
            x = augment(images, idx, cfg.augment, cfg.seed, epoch, self.size)
        x = self.precision.memory_layout(x)
        targets = bank.lookup(idx).to(self.device, non_blocking=True)  # [T, B] by idx
        with self.precision.autocast(self.device):
            out = self.forward(x)
        losses = torch.stack(
            [F.cross_entropy(z.float(), t) for z, t in zip(out.logits, targets, strict=True)]
        )
        return losses.mean(), losses.detach()

    def _pixels(self, initial: bool) -> bool:
        """The first labels from raw-pixel thumbnails rather than backbone features."""
        return initial and self.cfg.method.init in ("kmeans_pixels", "manifold_pixels")

    def embed(self, batches: Batches, num_samples: int, initial: bool) -> Embedded:
        if self._pixels(initial):
            fn = thumbnails(self.cfg.method.kmeans_pixel_size)
            return embed(fn, batches, self.device, self.size, num_samples)
        with self.precision.autocast(self.device):
            return embed(self.model.backbone, batches, self.device, self.size, num_samples)

    def first_bank(self) -> torch.Tensor | None:
        m = self.cfg.method
        if m.init != "random":
            return None
        return random_bank(m.heads, self.n, m.clusters, self.cfg.seed)

    def first_labels(self, emb: Embedded, bank: LabelBank) -> LabelUpdate:
        m, pixels = self.cfg.method, self._pixels(True)
        if m.init == "manifold_pixels":
            local = self._manifold(emb, self.cfg.seed, pixels, initial=True, bank=bank)
            return local, {"event": f"init_{m.init}", "labeller": "manifold"}
        local = kmeans_labels(
            emb,
            m.heads,
            m.clusters,
            m.kmeans_samples,
            self.cfg.seed,
            self.n,
            l2_normalize=not pixels,
            init_heads=self.model.heads if m.kmeans_init_heads else None,
            niter=m.kmeans_iters,
            seeding=m.kmeans_seeding,
            tol=m.kmeans_tol,
        )
        return local, {"event": f"init_{m.init}"}

    def update_labels(
        self, emb: Embedded, bank: LabelBank, step: int, manifold: bool
    ) -> LabelUpdate:
        m = self.cfg.method
        if manifold:
            local = self._manifold(emb, self.cfg.seed + step, False, initial=False, bank=bank)
            return local, {"event": "relabel", "labeller": "manifold"}
        local, st = sinkhorn_labels(
            self.model.heads,
            emb,
            m.lam,
            m.sinkhorn_tol,
            m.sinkhorn_max_iters,
            recompute=m.sinkhorn_logits == "recomputed",
        )
        record = {
            "event": "relabel",
            "sinkhorn_iters": max(st.iterations),
            "sinkhorn_error": max(st.errors),
        }
        return local, record

    def _manifold(
        self, emb: Embedded, seed: int, pixels: bool, initial: bool, bank: LabelBank
    ) -> torch.Tensor:
        m = self.cfg.method
        return manifold_labels(
            emb.features,
            emb.idx,
            m.heads,
            m.clusters,
            m.kmeans_samples,
            seed,
            self.n,
            neighbors=m.manifold_neighbors,
            dim=m.manifold_dim,
            restarts=m.manifold_restarts,
            candidates=m.manifold_init_candidates if initial else 1,
            select=m.manifold_init_select,
            l2_normalize=not pixels,
            align_to=None if initial else bank.labels,
        )
