"""Batched image augmentation whose randomness is a pure function of (seed, epoch, idx).

A resumed run therefore sees the same crops as an uninterrupted one without saving RNG state,
and the result does not depend on which rank or loader worker read the sample. Parameters are
drawn per sample on the host (numpy ``default_rng`` keyed by ``(seed, epoch, idx, view)``);
pixels are transformed for the whole batch at once on the batch's device: one
``affine_grid``/``grid_sample`` for RandomResizedCrop + rotation + flip, then colour jitter and
random grayscale as tensor arithmetic, as in SeLa's ImageNet pipeline.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from selfclust.config import AugmentConfig

# Inputs are scaled to [0, 1] and then standardised with these; BatchNorm follows the stem, so
# the exact values matter little, but they must be identical in training and label passes.
_MEAN, _STD = 0.5, 0.25


def normalize(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """uint8 [B, C, H, W] → float [B, C, size, size], standardised. No randomness."""
    x = images.float().div_(255.0)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - _MEAN) / _STD


def _params(cfg: AugmentConfig, seed: int, epoch: int, idx: np.ndarray, view: int) -> np.ndarray:
    """One row per sample: [sx, sy, angle, tx, ty, flip, apply_jitter, b, c, s, gray, order]."""
    out = np.empty((len(idx), 11), dtype=np.float64)
    log_r = (math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
    for row, i in enumerate(idx.tolist()):
        rng = np.random.default_rng((seed, epoch, int(i), view))
        u = rng.random(11)
        area = cfg.crop_scale[0] + (cfg.crop_scale[1] - cfg.crop_scale[0]) * u[0]
        ratio = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
        sx = min(1.0, math.sqrt(area * ratio))  # crop width as a fraction of the image width
        sy = min(1.0, math.sqrt(area / ratio))
        angle = math.radians(cfg.rotation) * (2 * u[2] - 1)
        tx = (1 - sx) * (2 * u[3] - 1)  # keeps the crop inside the image
        ty = (1 - sy) * (2 * u[4] - 1)
        flip = -1.0 if u[5] < cfg.hflip else 1.0
        jit = 1.0 if u[6] < cfg.jitter_p else 0.0
        b = 1 + cfg.brightness * (2 * u[7] - 1)
        c = 1 + cfg.contrast * (2 * u[8] - 1)
        s = 1 + cfg.saturation * (2 * u[9] - 1)
        gray = 1.0 if u[10] < cfg.grayscale else 0.0
        out[row] = (sx, sy, angle, tx, ty, flip, jit, b, c, s, gray)
    return out


def augment(
    images: torch.Tensor,
    idx: torch.Tensor,
    cfg: AugmentConfig,
    seed: int,
    epoch: int,
    size: int | None = None,
    view: int = 0,
) -> torch.Tensor:
    """uint8 [B, C, H, W] (any device) + idx [B] → augmented, standardised float [B, C, s, s]."""
    p = torch.from_numpy(_params(cfg, seed, epoch, idx.cpu().numpy(), view)).to(
        images.device, torch.float32
    )
    x = images.float().div_(255.0)
    b, ch, h, w = x.shape
    out = size or h
    cos, sin = torch.cos(p[:, 2]), torch.sin(p[:, 2])
    theta = torch.stack(
        [
            torch.stack([p[:, 0] * cos * p[:, 5], -p[:, 1] * sin, p[:, 3]], dim=1),
            torch.stack([p[:, 0] * sin * p[:, 5], p[:, 1] * cos, p[:, 4]], dim=1),
        ],
        dim=1,
    )  # [B, 2, 3]: output grid → input coordinates in [-1, 1]
    grid = F.affine_grid(theta, [b, ch, out, out], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    jit = p[:, 6].view(b, 1, 1, 1) > 0
    bright = torch.where(jit, p[:, 7].view(b, 1, 1, 1), torch.ones_like(jit, dtype=x.dtype))
    x = (x * bright).clamp_(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    con = torch.where(jit, p[:, 8].view(b, 1, 1, 1), torch.ones_like(bright))
    x = ((x - mean) * con + mean).clamp_(0, 1)
    if ch == 3:
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
        sat = torch.where(jit, p[:, 9].view(b, 1, 1, 1), torch.ones_like(bright))
        x = ((x - gray) * sat + gray).clamp_(0, 1)
        to_gray = p[:, 10].view(b, 1, 1, 1) > 0
        x = torch.where(to_gray, gray, x)
    return (x - _MEAN) / _STD
