"""What every clustering network returns, and helpers that hold for any of them.

SeLa's :class:`~selfclust.models.selflabel.SelfLabelNet` and the DEC/DEPICT/DGG nets of
:mod:`selfclust.methods.nets` both map images to :class:`NetOutput`; evaluation, the label pass
and the digest rely on nothing else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class NetOutput:
    features: torch.Tensor  # [B, D] pooled backbone features
    logits: list[torch.Tensor]  # T × [B, K]


def model_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer, in state_dict order, as contiguous CPU bytes."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def image_side(size: int | None, image: dict | None) -> int | None:
    """The square side images reach the network at: ``data.image_size``, else the shards' own
    size when every image is square and equal (None: unknown)."""
    if size is not None:
        return size
    if image and int(image["height"]) == int(image["width"]):
        return int(image["height"])
    return None
