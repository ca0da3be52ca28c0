"""SeLa (Asano, Rupprecht, Vedaldi, ICLR 2020): a ResNet with T heads trained by cross-entropy
on pseudo-labels that a distributed Sinkhorn-Knopp step makes equal-size over the whole data.

* Loss: ``mean_t CE(head_t(backbone(augment(x))), bank[t, idx])``, gradients by DDP.
* First labels (``method.init``): SeLa's random equal-size labels, k-means (faiss) of the
  untrained backbone's features or of raw-pixel thumbnails, or UMAP + a Gaussian mixture of
  the thumbnails.
* Label updates: Sinkhorn on each head's logits (:func:`selfclust.labels.sinkhorn.
  sinkhorn_labels`: logits never gathered); the last ``method.manifold_relabels`` cluster the
  backbone's features by UMAP + a Gaussian mixture instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from selfclust import collectives as C
from selfclust.config import RunConfig, SelaMethod, expect
from selfclust.data.augment import augment, normalize
from selfclust.data.streams import Batches
from selfclust.labels.bank import LabelBank
from selfclust.labels.label_pass import (
    Embedded,
    embed,
    kmeans_labels,
    predictions,
    random_bank,
    thumbnails,
)
from selfclust.labels.manifold import manifold_labels
from selfclust.labels.refine import RefinePlan, heads_to_centres
from selfclust.labels.sinkhorn import sinkhorn_labels
from selfclust.labels.sinkhorn_logits import recompute_logits
from selfclust.methods.base import LabelUpdate, Method
from selfclust.models.selflabel import SelfLabelNet
from selfclust.train.step import Precision

# Raw-pixel first labels (init=kmeans_pixels / manifold_pixels) cluster thumbnails of at most
# 16 x 16 pixels (every channel): MNIST's 28 px digits keep their strokes, and k-means over
# 256 dimensions per channel stays cheap; smaller images are used as they are.
THUMBNAIL_SIDE = 16
# Sinkhorn stops once every cluster's share is within 1e-3 of 1/K (relative): float32
# iterations stall near 1e-6, and the labels stop changing well before; the cap is only a cap.
SINKHORN_TOL = 1e-3
SINKHORN_MAX_ITERS = 1000
# method.relabel_heads=kmeans: k-means runs on the global sample beside the centres refined
# from the current labels; the best by the sample's mean cosine to its centre is kept.
KMEANS_RESTARTS = 4


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
        self.m = expect(cfg.method, SelaMethod)
        self.device, self.size, self.precision = device, image_size, precision
        self.forward = model  # the loop wraps it in DDP (Method.forward)
        # Augment in the loader workers (per-sample OpenCV) or batched on the device, with
        # parameters the loader draws (Method.device_augment).
        self.loader_augment = cfg.augment.where == "loader"
        self.device_augment = not self.loader_augment

    def batch_losses(
        self,
        images: torch.Tensor,
        idx: torch.Tensor,
        aug: torch.Tensor | None = None,
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
            x = augment(images, idx, cfg.augment, cfg.seed, epoch, self.size, params=aug)
        x = self.precision.memory_layout(x)
        targets = bank.lookup(idx, self.device)  # [T, B] by idx, pinned → device
        with self.precision.autocast(self.device):
            out = self.forward(x)
        losses = torch.stack(
            [F.cross_entropy(z.float(), t) for z, t in zip(out.logits, targets, strict=True)]
        )
        return losses.mean(), losses.detach()

    def _pixels(self, initial: bool) -> bool:
        """The first labels from raw-pixel thumbnails rather than backbone features."""
        return initial and self.m.init in ("kmeans_pixels", "manifold_pixels")

    def embed(self, batches: Batches, num_samples: int, initial: bool) -> Embedded:
        if self._pixels(initial):
            fn = thumbnails(THUMBNAIL_SIDE)
            return embed(fn, batches, self.device, self.size, num_samples, group=C.WORLD)
        # Without autocast: float32 features (convolutions in TF32 on GPUs), so bf16 rounding
        # of the features does not move borderline samples between clusters at each update.
        return embed(
            self.model.backbone, batches, self.device, self.size, num_samples, group=C.WORLD
        )

    def first_bank(self) -> torch.Tensor | None:
        m = self.m
        if m.init != "random":
            return None
        return random_bank(m.heads, self.n, m.clusters, self.cfg.seed)

    def first_labels(self, emb: Embedded, bank: LabelBank) -> LabelUpdate:
        m, pixels = self.m, self._pixels(True)
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
            group=C.WORLD,
        )
        return local, {"event": f"init_{m.init}"}

    def update_labels(
        self, emb: Embedded, bank: LabelBank, step: int, manifold: bool
    ) -> LabelUpdate:
        m = self.m
        if manifold:
            local = self._manifold(emb, self.cfg.seed + step, False, initial=False, bank=bank)
            return local, {"event": "relabel", "labeller": "manifold"}
        if self.device.type == "cuda":  # training's cached blocks back to the device
            torch.cuda.empty_cache()
        refined: dict[str, float] = {}
        if m.relabel_heads == "kmeans":  # heads re-set to cluster centres of the features
            plan = RefinePlan(m.clusters, KMEANS_RESTARTS, m.kmeans_samples, self.n,
                              self.cfg.seed + step)  # fmt: skip
            refined = heads_to_centres(self.model.heads, emb.features, emb.idx,
                                       bank.labels[:, emb.idx], plan, C.WORLD)  # fmt: skip
        recompute = recompute_logits(
            m.sinkhorn_logits, len(emb.features), m.clusters, self.device, C.WORLD
        )
        local, st = sinkhorn_labels(
            self.model.heads,
            emb.features,
            m.lam,
            SINKHORN_TOL,
            SINKHORN_MAX_ITERS,
            group=C.WORLD,
            recompute=recompute,
        )
        record = {
            "event": "relabel",
            "logits": "recomputed" if recompute else "stored",
            "sinkhorn_iters": max(st.iterations),
            "sinkhorn_error": max(st.errors),
        }
        record.update(refined)
        return local, record

    @property
    def refits_heads(self) -> bool:
        return self.m.final_refine

    def refit_heads(self, emb: Embedded) -> dict[str, Any]:
        """Each head re-set to the spherical k-means centres of the features refined from its
        own predictions (method.final_refine): the partition the features hold, not the one
        the head's last label update left."""
        current = predictions(self.model.heads, emb)
        plan = RefinePlan(self.m.clusters, 0, self.m.kmeans_samples, self.n, self.cfg.seed)
        heads_to_centres(self.model.heads, emb.features, emb.idx, current, plan, C.WORLD)
        return {"final_refine": True}

    def _manifold(
        self, emb: Embedded, seed: int, pixels: bool, initial: bool, bank: LabelBank
    ) -> torch.Tensor:
        m = self.m
        return manifold_labels(
            emb.features,
            emb.idx,
            m.heads,
            m.clusters,
            m.kmeans_samples,
            seed,
            self.n,
            neighbors=m.manifold_neighbors,
            candidates=m.manifold_init_candidates if initial else 1,
            l2_normalize=not pixels,
            align_to=None if initial else bank.labels,
            group=C.WORLD,
        )
