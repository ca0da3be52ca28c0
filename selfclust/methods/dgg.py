"""DGG (Yang et al., ICCV 2019): a VaDE-style Gaussian-mixture VAE with a classifier posterior.

Generative model (VaDE): ``c ~ Cat(π)``, ``z | c ~ N(μ_c, diag σ_c²)``, ``x | z ~ Bernoulli(g(z))``.
Inference: ``q(z|x) = N(μ̃, diag σ̃²)`` from the encoder f1 and — DGG's change to VaDE — the
cluster posterior ``γ_ic = q(c|x_i)`` from a classifier f2 on μ̃ instead of Bayes' rule. The
negative ELBO per sample (:func:`neg_elbo`) is

    −log p(x|z) + ½ Σ_c γ_c Σ_j [log σ_cj² + σ̃_j²/σ_cj² + (μ̃_j − μ_cj)²/σ_cj²]
                − ½ Σ_j (1 + log σ̃_j²) + Σ_c γ_c log(γ_c / π_c)

(the ±(M/2) log 2π of the two Gaussian terms cancel). The graph term lives in
:mod:`selfclust.methods.graph`. GMM statistics for initialisation and refreshes are
responsibility-weighted sums ``(Σ_i γ_ic, Σ_i γ_ic z_i, Σ_i γ_ic z_i²)`` — one all-reduce of a
``[K, 1 + 2M]`` float64 block; no per-sample data leaves its rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfclust import collectives as C
from selfclust.methods.autoencoder import DEC_HIDDEN, mlp

VAR_FLOOR = 1e-6  # smallest GMM variance: a cluster holding one point must not divide by 0


@dataclass
class VAEOutput:
    mean: torch.Tensor  # [B, M] μ̃
    log_var: torch.Tensor  # [B, M] log σ̃²
    z: torch.Tensor  # [B, M] one reparameterised sample μ̃ + σ̃ ε
    recon_logits: torch.Tensor  # [B, d] Bernoulli logits of x̂
    posterior_logits: torch.Tensor  # [B, K] classifier f2 on μ̃: log γ up to a constant


class DGGNet(nn.Module):
    """Encoder f1 (d-500-500-2000 → μ̃, log σ̃²), decoder g (M-2000-500-500-d) and classifier
    f2 (μ̃ → K); ``model(x)`` draws one z per sample with the module's own RNG stream."""

    def __init__(
        self,
        input_dim: int,
        clusters: int,
        latent_dim: int = 10,
        hidden: Sequence[int] = DEC_HIDDEN,
        classifier_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if clusters < 2:
            raise ValueError(f"DGG needs at least 2 clusters, got {clusters}")
        self.body = mlp([input_dim, *hidden], last_activation=True)
        self.to_mean = nn.Linear(hidden[-1], latent_dim)
        self.to_log_var = nn.Linear(hidden[-1], latent_dim)
        self.decoder = mlp([latent_dim, *reversed(hidden), input_dim])
        self.classifier = mlp([latent_dim, *classifier_hidden, clusters])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x.flatten(1))
        return self.to_mean(h), self.to_log_var(h)

    def forward(self, x: torch.Tensor) -> VAEOutput:
        mean, log_var = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        return VAEOutput(mean, log_var, z, self.decoder(z), self.classifier(mean))


class GaussianMixturePrior(nn.Module):
    """``π`` (softmax of logits), ``μ`` ``[K, M]``, ``log σ²`` ``[K, M]``: learnt by SGD with the
    network (as VaDE and DGG do), set from statistics by :meth:`load_statistics`."""

    def __init__(self, clusters: int, latent_dim: int) -> None:
        super().__init__()
        self.pi_logits = nn.Parameter(torch.zeros(clusters))
        self.mean = nn.Parameter(torch.zeros(clusters, latent_dim))
        self.log_var = nn.Parameter(torch.zeros(clusters, latent_dim))

    def log_pi(self) -> torch.Tensor:
        return F.log_softmax(self.pi_logits, dim=0)

    @torch.no_grad()
    def load_statistics(self, stats: torch.Tensor) -> None:
        """Set π, μ, σ² from :func:`gmm_statistics` (an M-step)."""
        pi, mean, var = gmm_parameters(stats)
        self.pi_logits.copy_(pi.log().float())
        self.mean.copy_(mean.float())
        self.log_var.copy_(var.log().float())

    def responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """VaDE's ``p(c | z)`` ``[B, K]`` by Bayes' rule (used to pretrain the classifier)."""
        var = self.log_var.exp()
        log_n = -0.5 * (
            math.log(2 * math.pi) + self.log_var[None] + (z[:, None] - self.mean[None]) ** 2 / var
        ).sum(-1)
        return F.softmax(self.log_pi()[None] + log_n, dim=1)


def gmm_statistics(z: torch.Tensor, gamma: torch.Tensor, group: C.Group) -> torch.Tensor:
    """``[K, 1 + 2M]`` float64: ``Σ_i γ_ic``, ``Σ_i γ_ic z_i``, ``Σ_i γ_ic z_i²`` over every rank
    of ``group`` (a collective).

    ``gamma`` may be soft responsibilities or one-hot k-means labels (the paper's
    initialisation). One all-reduce; the result is the same for any split of the rows.
    """
    if gamma.shape[0] != z.shape[0]:
        raise ValueError(f"{z.shape[0]} embeddings but {gamma.shape[0]} responsibilities")
    g, x = gamma.detach().double(), z.detach().double()
    stats = torch.cat([g.sum(0)[:, None], g.t() @ x, g.t() @ x.square()], dim=1)
    return C.all_reduce_sum(stats, group)


def gmm_parameters(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M-step from :func:`gmm_statistics`: ``π`` [K], ``μ`` [K, M], ``σ²`` [K, M] (float64).

    Raises if a cluster received no mass: its mean would be undefined; re-initialise instead
    of training on NaN.
    """
    n_k = stats[:, 0]
    m = (stats.shape[1] - 1) // 2
    if bool((n_k <= 0).any()):
        empty = torch.nonzero(n_k <= 0).flatten().tolist()
        raise ValueError(f"GMM cluster(s) {empty} have no members: re-run k-means (another seed)")
    mean = stats[:, 1 : 1 + m] / n_k[:, None]
    var = (stats[:, 1 + m :] / n_k[:, None] - mean.square()).clamp_min(VAR_FLOOR)
    return n_k / n_k.sum(), mean, var


def neg_elbo(
    x: torch.Tensor,
    out: VAEOutput,
    log_gamma: torch.Tensor,
    prior: GaussianMixturePrior,
    *,
    check_range: bool = True,
) -> torch.Tensor:
    """Negative ELBO per sample ``[B]`` with cluster posterior ``γ = exp(log_gamma)`` [B, K].

    ``x`` holds Bernoulli targets in [0, 1] (flattened inside); ``check_range`` checks that
    (reading x: off the CPU a host–device sync; the trainer's inputs are unit pixels by
    construction and skip it).
    """
    target = x.flatten(1).to(out.recon_logits.dtype)
    if check_range and bool(((target < 0) | (target > 1)).any()):
        raise ValueError("DGG's Bernoulli decoder needs inputs in [0, 1]: rescale the images")
    rec = F.binary_cross_entropy_with_logits(out.recon_logits, target, reduction="none").sum(1)
    gamma = log_gamma.exp()
    var_c = prior.log_var.exp()  # [K, M]
    per_c = (
        prior.log_var[None]
        + out.log_var.exp()[:, None] / var_c[None]
        + (out.mean[:, None] - prior.mean[None]) ** 2 / var_c[None]
    ).sum(-1)  # [B, K]
    kl_z = 0.5 * (gamma * per_c).sum(1) - 0.5 * (1 + out.log_var).sum(1)
    kl_c = (gamma * (log_gamma - prior.log_pi()[None])).sum(1)
    return rec + kl_z + kl_c
