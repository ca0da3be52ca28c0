"""DEPICT (Dizaji et al., ICCV 2017): conv autoencoder + softmax head, balanced soft targets.

Three pathways share one set of weights (paper §3.2):

    noisy encoder   z̃⁰ = drop(x),  z̃ˡ = drop(g(W_eˡ z̃ˡ⁻¹))      → p̃ = softmax(Θᵀ z̃ᴸ)  (predictions)
    decoder         ẑᴸ = z̃ᴸ,       ẑˡ⁻¹ = g(W_dˡ ẑˡ)              (reconstructions)
    clean encoder   z⁰ = x,         zˡ = g(W_eˡ zˡ⁻¹)              → p = softmax(Θᵀ zᴸ)   (targets)

Target (eq. 7):  q_ik ∝ p_ik / (Σ_i' p_i'k)^½ , the column sums over the WHOLE dataset.
Loss  (eq. 9):   −(1/N) Σ_i Σ_k q_ik log p̃_ik + (1/N) Σ_i Σ_{l<L} ‖z_iˡ − ẑ_iˡ‖² / |z_iˡ|.

Where the authors' released code (herandy/DEPICT) departs from the text, the defaults follow
the code, because the text's versions collapse here (docs/methods.md, "DEPICT"):

* target q_ik ∝ (p_ik / (Σ_i' p_i'k)^½)^a with a = 2, i.e. p_ik² / Σ_i' p_i'k (``power``; 1 is
  eq. 7). Eq. 7 does not sharpen: the noisy path learns targets as soft as the clean path's
  predictions, the predictions lose confidence every refresh (the cross-entropy grows from
  0.3 to 1.8 in 20 epochs on MNIST-test) and the partition drifts;
* hidden layers' reconstruction terms weighted 0.1 against the input's (``hidden_weight``);
* tanh on the embedding, leaky ReLU slope 0.01, dropout on the input and on every conv output
  but the last, none on the embedding.

Distributed: the column sums are the only global statistic (one all-reduce of a K-vector in
float64); p and q stay on the rank that computed them. ``model(x)`` runs all pathways in one
call (one forward per step; gradients are all-reduced by the trainer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfclust import collectives as C

NEGATIVE_SLOPE = 0.01  # leaky ReLU g(·) of every conv/deconv layer (the authors' code)


class ConvAutoencoder(nn.Module):
    """Strided convolutions (no pooling) then a fully connected embedding; the decoder mirrors
    them with a fully connected layer and strided transposed convolutions (paper §3.2).

    Defaults follow DEPICT's MNIST network: two conv layers of 50 channels (kernels 4 and 5,
    stride 2) and a 10-d embedding (= the number of clusters there). Transposed convolutions
    are given the encoder's exact spatial sizes, so any input size (8, 16, 28, 32 px) inverts.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        channels: Sequence[int] = (50, 50),
        kernels: Sequence[int] = (4, 5),
        embed_dim: int = 10,
        dropout: float = 0.1,
        bounded_output: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) != len(kernels) or not channels:
            raise ValueError(f"need one kernel size per conv layer, got {channels=} {kernels=}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self.bounded_output = bounded_output  # tanh on ẑ⁰, for inputs in [-1, 1]
        self.convs = nn.ModuleList()
        self.deconvs = nn.ModuleList()
        self.sizes: list[int] = [image_size]  # spatial size of z⁰, z¹, …
        cin, size = in_channels, image_size
        for cout, k in zip(channels, kernels, strict=True):
            pad = (k - 1) // 2
            self.convs.append(nn.Conv2d(cin, cout, k, stride=2, padding=pad))
            self.deconvs.append(nn.ConvTranspose2d(cout, cin, k, stride=2, padding=pad))
            size = (size + 2 * pad - k) // 2 + 1
            if size < 1:
                raise ValueError(f"image_size={image_size} is too small for {len(kernels)} convs")
            self.sizes.append(size)
            cin = cout
        self.top_shape = (cin, size, size)
        flat = cin * size * size
        self.embed = nn.Linear(flat, embed_dim)
        self.unembed = nn.Linear(embed_dim, flat)
        self.embed_dim = embed_dim

    @staticmethod
    def _g(x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, NEGATIVE_SLOPE)

    def encode(self, x: torch.Tensor, noisy: bool) -> list[torch.Tensor]:
        """Encoder outputs ``[z⁰, z¹, …, zᴸ]`` (zᴸ = tanh(embed): ``[B, embed_dim]``); when
        ``noisy``, dropout on the input and after every conv layer but the last."""
        p = self.dropout if noisy else 0.0
        h = F.dropout(x, p, training=p > 0)
        layers = [h]
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            h = self._g(conv(h))
            if i < last:
                h = F.dropout(h, p, training=p > 0)
            layers.append(h)
        layers.append(torch.tanh(self.embed(h.flatten(1))))
        return layers

    def decode(self, top: torch.Tensor) -> list[torch.Tensor]:
        """Reconstructions ``[ẑ⁰, …, ẑᴸ⁻¹]`` from a code ``[B, embed_dim]``; ẑ⁰ is linear, or
        tanh with ``bounded_output`` (inputs in [-1, 1], as the authors scale them)."""
        h = self._g(self.unembed(top)).view(-1, *self.top_shape)
        out = [h]
        for i in reversed(range(len(self.deconvs))):
            size = self.sizes[i]
            h = self.deconvs[i](h, output_size=[size, size])
            if i > 0:
                h = self._g(h)
            elif self.bounded_output:
                h = torch.tanh(h)
            out.append(h)
        return out[::-1]


@dataclass
class DEPICTOutput:
    noisy_logits: torch.Tensor  # [B, K] Θᵀ z̃ᴸ: the predictions p̃ the loss trains
    clean_logits: torch.Tensor  # [B, K] Θᵀ zᴸ: p for the targets (and final assignments)
    clean: list[torch.Tensor]  # [z⁰ … zᴸ] clean encoder outputs
    reconstructions: list[torch.Tensor]  # [ẑ⁰ … ẑᴸ⁻¹] decoder outputs from the noisy code


class DEPICTNet(nn.Module):
    """Conv autoencoder with a softmax clustering layer on the embedding."""

    def __init__(self, autoencoder: ConvAutoencoder, clusters: int) -> None:
        super().__init__()
        if clusters < 2:
            raise ValueError(f"DEPICT needs at least 2 clusters, got {clusters}")
        self.ae = autoencoder
        self.head = nn.Linear(autoencoder.embed_dim, clusters)

    def forward(self, x: torch.Tensor, noisy_input: torch.Tensor | None = None) -> DEPICTOutput:
        """All pathways on ``x``; with ``noisy_input`` (e.g. an augmented ``x``, same shape)
        the noisy encoder reads that instead, and the decoder still reconstructs ``x``'s clean
        layers from its code."""
        noisy = self.ae.encode(x if noisy_input is None else noisy_input, noisy=True)
        clean = self.ae.encode(x, noisy=False)
        recon = self.ae.decode(noisy[-1])
        return DEPICTOutput(self.head(noisy[-1]), self.head(clean[-1]), clean, recon)

    def clean_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Clean-path logits only (label pass, evaluation): ``[B, K]``."""
        return self.head(self.ae.encode(x, noisy=False)[-1])


def column_sums(p: torch.Tensor, group: C.Group) -> torch.Tensor:
    """``Σ_i p_ik`` over the rows of every rank of ``group``: ``[K]`` float64; a collective
    (one all-reduce)."""
    return C.all_reduce_sum(p.detach().double().sum(0), group)


def check_column_sums(sums: torch.Tensor, clusters: int) -> torch.Tensor:
    """``sums`` if it is a positive ``[K]`` vector, else a ValueError. Reads the values: off
    the CPU a host–device sync, so a training step checks them once per refresh."""
    if sums.shape != (clusters,) or not bool((sums > 0).all()):
        raise ValueError(f"column sums must be a positive [{clusters}] vector, got {sums}")
    return sums


def balanced_target(
    p: torch.Tensor, sums: torch.Tensor, power: float = 2.0, *, checked: bool = False
) -> torch.Tensor:
    """``q_ik = (p_ik / s_k^½)^a / Σ_k' (p_ik' / s_k'^½)^a`` with the global column sums ``s``
    [K] and ``a = power``; float64, detached. ``power=1`` is eq. 7 as printed; 2 (the
    default) is the authors' code, ``p² / s``, which sharpens as well as balances. A cluster
    no sample prefers (tiny s_k) gains weight, which keeps the assignments balanced.
    ``checked``: ``sums`` passed :func:`check_column_sums` already (only the shape is checked
    here then: no sync)."""
    if not checked:
        check_column_sums(sums, p.shape[1])
    elif sums.shape != (p.shape[1],):
        raise ValueError(f"column sums must be a positive [{p.shape[1]}] vector, got {sums}")
    if not power > 0:
        raise ValueError(f"target power must be positive, got {power}")
    q = p.detach().double() / sums.double().sqrt()[None, :]
    return torch.softmax(power * q.log(), dim=1)  # log domain: p^a can underflow


@dataclass
class DEPICTLoss:
    total: torch.Tensor
    clustering: torch.Tensor  # cross-entropy −mean_i Σ_k q_ik log p̃_ik
    reconstruction: torch.Tensor  # mean_i Σ_l ‖zˡ − ẑˡ‖² / |zˡ|


# The authors' code weights the hidden layers' reconstruction terms 0.1 against the input's
# (eq. 9 as printed: 1); the shipped DEPICT recipes were measured with 0.1.
HIDDEN_RECON_WEIGHT = 0.1


def depict_loss(
    out: DEPICTOutput, target: torch.Tensor, hidden_weight: float = HIDDEN_RECON_WEIGHT
) -> DEPICTLoss:
    """Eq. 9 on a batch: clustering cross-entropy of the noisy predictions against ``target``
    ``[B, K]`` plus the layer-wise reconstruction between clean encoder and decoder layers,
    the hidden layers' terms times ``hidden_weight`` (1 is eq. 9 as printed; 0.1 the
    authors' code)."""
    if len(out.reconstructions) != len(out.clean) - 1:
        raise ValueError("need one reconstruction per clean layer below the embedding")
    log_p_noisy = F.log_softmax(out.noisy_logits.float(), dim=1)
    ce = -(target.detach().to(log_p_noisy.dtype) * log_p_noisy).sum(1).mean()
    # ‖zˡ − ẑˡ‖² / |zˡ| per sample is the per-layer mean squared error; averaged over the batch.
    pairs = zip(out.clean[:-1], out.reconstructions, strict=True)
    rec = sum(
        (
            (1.0 if layer == 0 else hidden_weight) * F.mse_loss(r.float(), z.float())
            for layer, (z, r) in enumerate(pairs)
        ),
        start=torch.zeros((), device=ce.device),
    )
    return DEPICTLoss(ce + rec, ce, rec)
