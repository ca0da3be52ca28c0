"""Raw shard samples → one batch of uint8 images with their idx and cls, in a loader worker."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from selfclust.data.augment import LoaderAugment
from selfclust.data.reader import decode


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, C] arrays → [B, C, H, W]."""
    if any(a.shape != arrays[0].shape for a in arrays):
        shapes = sorted({a.shape for a in arrays})
        raise ValueError(
            f"images of different sizes in one batch ({shapes[:3]}); "
            "pass image_size to resize them to a common size"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class Decoder:
    """Turns raw samples into one batch: decode only (device augmentation later), or decode +
    crop + colour in the loader (``aug``)."""

    def __init__(self, channels: int, image_size: int | None, aug: LoaderAugment | None):
        self.channels, self.image_size, self.aug = channels, image_size, aug

    def one(self, sample: dict) -> tuple[Any, ...] | None:
        """→ (image, idx, cls), None when the image is bad."""
        if self.aug is not None:
            return self.aug.sample(sample)
        return decode(sample, self.channels, self.image_size)

    def batch(
        self, items: list[tuple[Any, ...]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ (images uint8 [B, C, H, W], idx int64 [B], cls int64 [B])."""
        if self.aug is not None:
            images = torch.stack([it[0] for it in items])
        else:
            images = _stack([it[0] for it in items])
        idx = torch.tensor([it[-2] for it in items], dtype=torch.int64)
        cls = torch.tensor([it[-1] for it in items], dtype=torch.int64)
        return images, idx, cls
