"""DEC, DEPICT and DGG networks behind the interface the rest of selfclust reads.

Evaluation, the label pass and the pictures treat a model as :class:`~selfclust.model.
SelfLabelNet` does: ``backbone(x)`` maps standardised images to features, ``heads`` map
features to cluster scores (here exactly one head), ``model(x)`` returns a ``NetOutput``.
:class:`ClusterNet` gives each method's network that interface, and adds what the trainer
needs: ``inputs`` (uint8 images → the pixels the method trains on), ``features`` and
``scores``. The clustering scores are DEC's Student-t ``log q``, DEPICT's softmax logits and
DGG's classifier logits; their argmax is the cluster in every case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfclust.config import AugmentConfig, DecMethod, DepictMethod, DggMethod, RunConfig, expect
from selfclust.data.augment import augment, normalize
from selfclust.methods.autoencoder import MLPAutoencoder
from selfclust.methods.dec import DECNet
from selfclust.methods.depict import ConvAutoencoder, DEPICTNet
from selfclust.methods.dgg import DGGNet, GaussianMixturePrior
from selfclust.models.base import NetOutput

_MEAN, _STD = 0.5, 0.25  # selfclust.data.augment.normalize's constants


def unit_pixels(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` → float in [0, 1], resized to ``size`` if given."""
    x = images.float().div_(255.0)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.clamp_(0.0, 1.0)
    return x


class ClusterNet(nn.Module):
    """One method's network with SelfLabelNet's evaluation interface (see the module doc)."""

    def __init__(self, pixels: str, clusters: int) -> None:
        super().__init__()
        self.pixels = pixels
        self.clusters = clusters

    def inputs(self, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """uint8 images → what the method trains and embeds on."""
        if self.pixels == "standardized":
            return normalize(images, size)
        return self._from_unit(unit_pixels(images, size))

    def augmented_inputs(
        self,
        images: torch.Tensor,
        idx: torch.Tensor,
        cfg: AugmentConfig,
        seed: int,
        epoch: int,
        size: int | None = None,
    ) -> torch.Tensor:
        """:func:`selfclust.data.augment.augment` of uint8 images (random per sample and epoch,
        standardised) in this net's pixel convention, as :meth:`inputs` gives it."""
        x = augment(images, idx, cfg, seed, epoch, size)
        if self.pixels == "standardized":
            return x
        return self._from_unit(x.mul_(_STD).add_(_MEAN).clamp_(0.0, 1.0))

    def _from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] → this net's range ([-1, 1] for ``signed``), in place."""
        return x.mul_(2.0).sub_(1.0) if self.pixels == "signed" else x

    def features(self, x: torch.Tensor) -> torch.Tensor:  # the embedding the label pass keeps
        raise NotImplementedError

    def score_head(self) -> nn.Module:  # features → cluster scores [B, K]
        raise NotImplementedError

    @property
    def heads(self) -> nn.ModuleList:
        """The one clustering head, as SelfLabelNet's ``heads`` (not registered twice)."""
        return nn.ModuleList([self.score_head()])

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.score_head()(features)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """Features of *standardised* images (SelfLabelNet's input convention)."""
        if self.pixels != "standardized":
            x = self._from_unit((x * _STD + _MEAN).clamp_(0.0, 1.0))
        return self.features(x)

    def stage_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise ValueError(
            "linear probes read ResNet stages (method.name=sela); this run's network is "
            f"{type(self).__name__}: evaluate it with `selfclust evaluate` instead"
        )

    def forward(self, x: torch.Tensor) -> NetOutput:
        f = self.backbone(x)
        return NetOutput(features=f, logits=[self.scores(f)])


class DECModel(ClusterNet):
    """DEC: MLP autoencoder d-…-embed_dim (paper: d-500-500-2000-10) + Student-t centroids."""

    def __init__(self, cfg: RunConfig, input_dim: int) -> None:
        m = expect(cfg.method, DecMethod)
        super().__init__(m.pixels, m.clusters)
        self.net = DECNet(MLPAutoencoder(input_dim, m.embed_dim, m.hidden), m.clusters)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.ae.encode(x)

    def score_head(self) -> nn.Module:
        return self.net.clustering


class DEPICTModel(ClusterNet):
    """DEPICT: strided-conv autoencoder (paper's MNIST net: 50/50 channels, kernels 4/5) with a
    softmax head on the clean embedding."""

    def __init__(self, cfg: RunConfig, channels: int, size: int) -> None:
        m = expect(cfg.method, DepictMethod)
        super().__init__(m.pixels, m.clusters)
        ae = ConvAutoencoder(
            channels,
            size,
            m.conv_channels,
            m.conv_kernels,
            m.embed_dim,
            m.noise_dropout,
            bounded_output=m.pixels == "signed",
        )
        self.net = DEPICTNet(ae, m.clusters)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.ae.encode(x, noisy=False)[-1]

    def score_head(self) -> nn.Module:
        return self.net.head


class DGGModel(ClusterNet):
    """DGG: VaDE's MLP VAE (d-500-500-2000, latent embed_dim) + classifier on μ̃ + the GMM
    prior (a submodule, so the optimiser and checkpoints see it)."""

    def __init__(self, cfg: RunConfig, input_dim: int) -> None:
        m = expect(cfg.method, DggMethod)
        super().__init__(m.pixels, m.clusters)
        self.net = DGGNet(input_dim, m.clusters, m.embed_dim, m.hidden)
        self.prior = GaussianMixturePrior(m.clusters, m.embed_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.encode(x)[0]

    def score_head(self) -> nn.Module:
        return self.net.classifier


def build_cluster_net(cfg: RunConfig, channels: int, size: int | None) -> ClusterNet:
    """The network of ``cfg.method.name`` (dec, depict or dgg) for ``channels``×size² images."""
    name = cfg.method.name
    if size is None:
        raise ValueError(
            f"method.name={name} needs images of one size: the shards hold mixed sizes; "
            "set data.image_size"
        )
    if name == "dec":
        return DECModel(cfg, channels * size * size)
    if name == "depict":
        return DEPICTModel(cfg, channels, size)
    if name == "dgg":
        return DGGModel(cfg, channels * size * size)
    raise ValueError(f"no cluster net for method.name={name!r} (sela uses SelfLabelNet)")
