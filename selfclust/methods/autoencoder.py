"""Fully connected autoencoders for DEC (and the VAE body of DGG): d-500-500-2000-10.

DEC and DGG both embed flattened images with the stack van der Maaten (2009) proposed and DEC
adopted for every dataset: ``d-500-500-2000-10`` with ReLU between layers and a linear
embedding. DEC pretrains it as a denoising autoencoder (input dropout 20 %); here pretraining
is end-to-end (:func:`denoising_loss`) rather than DEC's greedy layer-wise pass, because one
end-to-end phase runs on the trainer's ordinary step loop and reaches the same kind of
reconstruction (see docs/methods.md for the choice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEC_HIDDEN = (500, 500, 2000)  # the paper's hidden widths; the embedding width is separate


def mlp(dims: Sequence[int], last_activation: bool = False) -> nn.Sequential:
    """Linear layers ``dims[0] → … → dims[-1]`` with ReLU between them (and after the last one
    only if ``last_activation``)."""
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"an MLP needs at least two positive widths, got {list(dims)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 or last_activation:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@dataclass
class AEOutput:
    embedding: torch.Tensor  # [B, d_z] the code z = f_θ(x)
    reconstruction: torch.Tensor  # [B, d] in the (flattened) input space


class MLPAutoencoder(nn.Module):
    """``x [B, ...] → z [B, d_z] → x̂ [B, d]``; images are flattened first.

    ``model(x)`` returns both the embedding and the reconstruction, so one DDP forward serves
    the pretraining loss (reconstruction) and DEC's clustering loss (embedding) alike.
    """

    def __init__(
        self, input_dim: int, embed_dim: int = 10, hidden: Sequence[int] = DEC_HIDDEN
    ) -> None:
        super().__init__()
        if input_dim < 1 or embed_dim < 1:
            raise ValueError(f"input_dim and embed_dim must be >= 1, got {input_dim}, {embed_dim}")
        self.input_dim, self.embed_dim = input_dim, embed_dim
        self.encoder = mlp([input_dim, *hidden, embed_dim])
        self.decoder = mlp([embed_dim, *reversed(hidden), input_dim])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.flatten(1))

    def forward(self, x: torch.Tensor) -> AEOutput:
        z = self.encode(x)
        return AEOutput(z, self.decoder(z))


def denoising_loss(
    model: nn.Module, x: torch.Tensor, dropout: float = 0.2
) -> tuple[torch.Tensor, AEOutput]:
    """Pretraining loss of a denoising autoencoder: ``mean ‖x − g(f(drop(x)))‖² / d``.

    Input dropout (DEC: 20 %) corrupts the input only; the target is the clean input. Returns
    the loss and the model output (whose embedding is of the corrupted input).
    """
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    flat = x.flatten(1)
    out = model(F.dropout(flat, dropout, training=dropout > 0))
    return F.mse_loss(out.reconstruction, flat), out
