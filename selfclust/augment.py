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
  ``horizontal_flip``; JPEGs are DCT-downscaled while decoding when the crop will shrink) and
  colour-jitters it with v2's ``adjust_*`` / ``rgb_to_grayscale`` on the PIL image, handing
  over uint8 images of the output size: the standard layout for large JPEG datasets.

Both use torchvision's colour formulas (``adjust_brightness/contrast/saturation``,
``rgb_to_grayscale``: the device path as float arithmetic on the batch, the loader path through
Pillow on uint8, which rounds after each step) and sample the same fractional crop box, so
without rotation they agree up to that rounding, resampling at the box borders and
antialiasing when a crop shrinks. With ``rotation`` the loader path fills
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
    return x.sub_(_MEAN).div_(_STD)  # in place: the same bits as (x - mean) / std, one buffer


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
    """[N, 3, H, W] → [N, 1, H, W]."""
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device)
    return torch.einsum("nchw,c->nhw", x, w).unsqueeze(1)


def colour(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Jitter + random grayscale of float images in [0, 1]: x [N, C, H, W], p [N, 11].

    Per sample this equals torchvision's ``adjust_brightness``, ``adjust_contrast``,
    ``adjust_saturation`` (each skipped unless the sample's jitter fires) and then
    ``rgb_to_grayscale(num_output_channels=3)``; done as arithmetic on the whole batch."""
    n, ch = x.shape[:2]
    jit = p[:, 6] > 0

    def factor(col: int) -> torch.Tensor:  # [N, 1, 1, 1]; 1 where the jitter does not fire
        return torch.where(jit, p[:, col], 1.0).to(x.dtype).view(n, 1, 1, 1)

    x = x.mul(factor(7)).clamp_(0, 1)  # brightness: blend with black
    c = factor(8)  # contrast: blend with the mean of the grayscale image
    mean = (_luma(x) if ch == 3 else x).mean(dim=(1, 2, 3), keepdim=True)
    x = x.mul_(c).add_((1 - c) * mean).clamp_(0, 1)
    if ch == 3:
        s = factor(9)  # saturation: blend with the grayscale image
        gray_x = (1 - s) * _luma(x)  # before x changes in place
        x = x.mul_(s).add_(gray_x).clamp_(0, 1)
        gray = p[:, 10] > 0
        if gray.any():
            x[gray] = _luma(x[gray]).expand(-1, 3, -1, -1)
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

    ``sample`` decodes one shard sample and crops and colour-jitters each view to ``size``;
    ``batch`` stacks them. Output equals :func:`augment` with the same (seed, epoch, idx, view)
    up to rounding and resampling; it is uint8, so ``normalize`` it on the device before the
    model."""

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
        for row in p.tolist():
            sx, sy, angle, tx, ty, flip = row[:6]
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
            v = _colour_pil(v, row)
            a = np.asarray(v)
            out.append(a[:, :, None] if a.ndim == 2 else a)
        views = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
        return views, torch.from_numpy(p).float(), idx, cls

    def batch(self, views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """views uint8 [B, V, C, s, s] → [B, C, s, s] (one view) or [V, B, C, s, s]."""
        return views[:, 0] if views.shape[1] == 1 else views.transpose(0, 1).contiguous()


def _colour_pil(im: Image.Image, row: list[float]) -> Image.Image:
    """:func:`colour` for one PIL image with torchvision v2's PIL kernels (Pillow's C code on
    uint8, which rounds after each step: within a few grey levels of the float version)."""
    if row[6] > 0:
        im = TF.adjust_brightness(im, row[7])
        im = TF.adjust_contrast(im, row[8])
        if im.mode == "RGB":
            im = TF.adjust_saturation(im, row[9])
    if row[10] > 0 and im.mode == "RGB":
        im = TF.rgb_to_grayscale(im, num_output_channels=3)
    return im
