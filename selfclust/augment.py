"""SeLa's augmentations whose randomness is a pure function of (seed, epoch, idx, view).

A resumed run therefore sees the same crops as an uninterrupted one without saving RNG state,
and the result does not depend on which rank or loader worker read the sample. Parameters are
drawn per sample on the host (numpy ``default_rng((seed, epoch, idx, view))``): a
RandomResizedCrop box (area scale, log-uniform aspect ratio), an optional rotation, a
horizontal flip, colour jitter (brightness, contrast, saturation, applied in that fixed order)
and random grayscale, as in SeLa's ImageNet pipeline.

Two places can apply them, with the same parameters:

* **device** (:func:`augment`, the default): loader workers only decode; the whole batch is
  cropped/rotated/flipped with one ``affine_grid``/``grid_sample`` and colour-jittered as
  tensor arithmetic on the batch's device (GPU-friendly; needs equal-size inputs, e.g.
  ``data.image_size``).
* **loader** (:class:`LoaderAugment`): each loader worker crops every sample from its full-size
  decoded image (Pillow's antialiased resize of the crop box, which is what v2's
  ``resized_crop`` runs on PIL images, without rounding the box; then v2 ``rotate`` and
  ``horizontal_flip``; JPEGs are DCT-downscaled while decoding when the crop will shrink), then
  colour-jitters the batch with the same arithmetic as the device path and hands over uint8
  images of the output size: the standard layout for large JPEG datasets like ImageNet.

The colour formulas are torchvision's (``adjust_brightness/contrast/saturation``,
``rgb_to_grayscale``), and both places sample the same fractional crop box, so without
rotation they agree up to resampling at the box borders and antialiasing when a crop shrinks
(on CIFAR-10 crops: mean difference 0.4 grey levels). With ``rotation`` the loader path fills
the rotated-in corners with black where the device path samples the surrounding image.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from selfclust.config import AugmentConfig
from selfclust.reader import IMAGE_ERRORS, image_field, open_image

# Inputs are scaled to [0, 1] and then standardised with these; BatchNorm follows the stem, so
# the exact values matter little, but they must be identical in training and label passes.
_MEAN, _STD = 0.5, 0.25
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def normalize(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """uint8 [..., C, H, W] → float [..., C, size, size], standardised. No randomness."""
    x = images.float().div_(255.0)
    if size is not None and x.shape[-1] != size:
        lead = x.shape[:-3]
        x = F.interpolate(
            x.flatten(0, -4) if lead else x[None],
            size=(size, size),
            mode="bilinear",
            align_corners=False,
        )
        x = x.view(*lead, *x.shape[-3:]) if lead else x[0]
    return (x - _MEAN) / _STD


def _params(cfg: AugmentConfig, seed: int, epoch: int, idx: np.ndarray, view: int) -> np.ndarray:
    """One row per sample: [sx, sy, angle, tx, ty, flip, apply_jitter, b, c, s, gray].

    (sx, sy): crop half-extent and (tx, ty): crop centre, in [-1, 1] image coordinates."""
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


def _luma(x: torch.Tensor) -> torch.Tensor:
    return _GRAY[0] * x[:, 0:1] + _GRAY[1] * x[:, 1:2] + _GRAY[2] * x[:, 2:3]


def colour(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Jitter + random grayscale of float images in [0, 1]: x [N, C, H, W], p [N, 11].

    Per sample this equals torchvision's ``adjust_brightness``, ``adjust_contrast``,
    ``adjust_saturation`` (each skipped unless the sample's jitter fires) and then
    ``rgb_to_grayscale(num_output_channels=3)``; done as arithmetic on the whole batch."""
    n, ch = x.shape[:2]
    ones = torch.ones(n, 1, 1, 1, dtype=x.dtype, device=x.device)
    jit = p[:, 6].view(n, 1, 1, 1) > 0

    def factor(col: int) -> torch.Tensor:
        return torch.where(jit, p[:, col].view(n, 1, 1, 1).to(x.dtype), ones)

    x = (x * factor(7)).clamp_(0, 1)
    mean = (_luma(x) if ch == 3 else x).mean(dim=(1, 2, 3), keepdim=True)
    c = factor(8)
    x = (c * x + (1 - c) * mean).clamp_(0, 1)
    if ch == 3:
        s = factor(9)
        x = (s * x + (1 - s) * _luma(x)).clamp_(0, 1)
        to_gray = p[:, 10].view(n, 1, 1, 1) > 0
        x = torch.where(to_gray, _luma(x).expand_as(x), x)
    return x


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
    return (colour(x, p) - _MEAN) / _STD


def augment_views(
    images: torch.Tensor,
    idx: torch.Tensor,
    cfg: AugmentConfig,
    seed: int,
    epoch: int,
    size: int | None = None,
    views: int = 2,
) -> torch.Tensor:
    """``views`` independent augmentations of a batch (multi-view methods): [V, B, C, s, s]."""
    return torch.stack([augment(images, idx, cfg, seed, epoch, size, v) for v in range(views)])


class LoaderAugment:
    """The loader-side path: runs in DataLoader workers, per sample then per batch.

    ``sample`` decodes one shard sample and crops each view to ``size`` (transforms v2 on the
    PIL image); ``batch`` colour-jitters a batch of them. Output equals :func:`augment` with the
    same (seed, epoch, idx, view) up to resampling; it is uint8, so ``normalize`` it on the
    device before the model."""

    def __init__(
        self, cfg: AugmentConfig, seed: int, epoch: int, size: int, views: int, channels: int
    ) -> None:
        if size < 1 or views < 1:
            raise ValueError(f"size and views must be >= 1, got {size}, {views}")
        self.cfg, self.seed, self.epoch = cfg, seed, epoch
        self.size, self.views, self.channels = size, views, channels

    def sample(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
        """→ (uint8 [V, C, s, s] cropped views, params [V, 11], idx, cls), None if it is bad."""
        idx = int(sample["idx"]) if "idx" in sample else int(sample["__key__"])
        cls = int(sample["cls"]) if "cls" in sample else -1
        i = np.array([idx])
        p = np.concatenate(
            [_params(self.cfg, self.seed, self.epoch, i, v) for v in range(self.views)]
        )
        s = self.size
        # Decode a JPEG only as large as the smallest crop still needs (DCT scaling).
        draft = (math.ceil(s / p[:, 0].min()), math.ceil(s / p[:, 1].min()))
        try:
            im = open_image(image_field(sample), self.channels, draft)
        except IMAGE_ERRORS:
            return None
        out = []
        for sx, sy, angle, tx, ty, flip, *_ in p.tolist():
            w, h = im.size
            # The crop box in pixel edges, as the device path's sampling grid spans it; Pillow
            # resizes from a fractional box (v2's resized_crop would round it to whole pixels).
            left, right = max(0.0, (1 + tx - sx) * w / 2), min(w, (1 + tx + sx) * w / 2)
            top, bottom = max(0.0, (1 + ty - sy) * h / 2), min(h, (1 + ty + sy) * h / 2)
            box = (left, top, right, bottom)
            v = im.resize((s, s), Image.Resampling.BILINEAR, box=box)
            if angle:  # about the crop centre; corners are black (the device path fills
                # them from around the crop), so rotation matches only approximately
                v = TF.rotate(v, math.degrees(angle), TF.InterpolationMode.BILINEAR)
            if flip < 0:
                v = TF.horizontal_flip(v)
            a = np.asarray(v)
            out.append(a[:, :, None] if a.ndim == 2 else a)
        views = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
        return views, torch.from_numpy(p).float(), idx, cls

    def batch(self, views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """views uint8 [B, V, C, s, s], params [B, V, 11] → uint8 [B, C, s, s] (one view) or
        [V, B, C, s, s]."""
        b, nv = views.shape[:2]
        x = views.transpose(0, 1).reshape(nv * b, *views.shape[2:]).float().div_(255.0)
        x = colour(x, params.transpose(0, 1).reshape(nv * b, -1))
        x = x.mul_(255.0).round_().to(torch.uint8).view(nv, b, *views.shape[2:])
        return x[0] if nv == 1 else x
