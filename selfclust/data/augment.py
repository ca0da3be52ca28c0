"""SeLa's augmentations whose randomness is a pure function of (seed, epoch, idx, view).

A resumed run therefore sees the same crops as an uninterrupted one without saving RNG state,
and the result does not depend on which rank or loader worker read the sample. Parameters are
drawn per sample on the host (numpy ``default_rng((seed, epoch, idx, view))``): a
RandomResizedCrop box (area scale, log-uniform aspect ratio), an optional rotation, a
horizontal flip, colour jitter (brightness, contrast, saturation, applied in that fixed order;
no hue) and random grayscale: the augmentation families of SeLa's ImageNet pipeline.

Two places can apply them, with the same parameters:

* **device** (:func:`augment`, the default): loader workers only decode; the whole batch is
  cropped/rotated/flipped with one ``affine_grid``/``grid_sample`` and colour-jittered as
  tensor arithmetic on the batch's device (GPU-friendly; needs equal-size inputs, e.g.
  ``data.image_size``).
* **loader** (:class:`LoaderAugment`): each loader worker crops every sample from its full-size
  decoded image with the device path's affine map (crop box, rotation and flip as one OpenCV
  ``warpAffine``, bilinear, zeros outside the image as ``grid_sample`` pads; JPEGs are
  DCT-downscaled while decoding when the crop will shrink, and a crop that still shrinks is
  area-averaged first, so it does not alias) and colour-jitters it on uint8 (lookup tables and
  OpenCV's weighted sums), handing over uint8 images of the output size: the standard layout
  for large JPEG datasets. Per 224-px JPEG this is ~0.7 ms of work against ~1.6 ms for the
  same steps through Pillow (``resize`` with a box, v2's ``adjust_*`` on PIL images).

Both use torchvision's colour formulas (``adjust_brightness/contrast/saturation``,
``rgb_to_grayscale``: the device path as float arithmetic on the batch, the loader path on
uint8, rounding after each step) and the same geometry, so they agree to about half a grey
level on average (rotations included) when the crop does not shrink; when it does, the
device path samples without antialiasing and the loader path area-averages.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from selfclust.config import AugmentConfig
from selfclust.data.reader import IMAGE_ERRORS, image_field, open_image

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
        b = 1 + cfg.jitter * (2 * u[7] - 1)
        c = 1 + cfg.jitter * (2 * u[8] - 1)
        s = 1 + cfg.jitter * (2 * u[9] - 1)
        gray = 1.0 if u[10] < cfg.grayscale else 0.0
        out[row] = (sx, sy, angle, tx, ty, flip, jit, b, c, s, gray)
    return out


def draw_params(
    cfg: AugmentConfig, seed: int, epoch: int, idx: torch.Tensor, view: int = 0
) -> torch.Tensor:
    """float32 [B, 11] augmentation parameters of samples ``idx`` on the host. The training
    loader's workers draw them with each batch (``train_batches(device_augment=...)``), so the
    step neither spends host time on them nor waits for a copy."""
    return torch.from_numpy(_params(cfg, seed, epoch, idx.cpu().numpy(), view)).float()


def _luma(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] → [N, 1, H, W]."""
    return torch.einsum("nchw,c->nhw", x, _luma_weights(x.dtype, x.device)).unsqueeze(1)


_WEIGHTS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _luma_weights(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The luma weights on ``device``, made once: building a tensor from Python numbers on a
    GPU is a blocking host-to-device copy, which would stall every step."""
    key = (dtype, device)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = torch.tensor(_GRAY, dtype=dtype, device=device)
    return _WEIGHTS[key]


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
        # Every sample's luma, kept where the draw says grayscale: no data-dependent branch or
        # boolean indexing, which would make the host wait for the GPU.
        gray = (p[:, 10] > 0).view(n, 1, 1, 1)
        x = torch.where(gray, _luma(x).expand(-1, 3, -1, -1), x)
    return x


def augment(
    images: torch.Tensor,
    idx: torch.Tensor,
    cfg: AugmentConfig,
    seed: int,
    epoch: int,
    size: int | None = None,
    view: int = 0,
    params: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 [B, C, H, W] (any device) + idx [B] → augmented, standardised float [B, C, s, s].

    ``params``: the batch's :func:`draw_params` when the loader already drew them."""
    p = draw_params(cfg, seed, epoch, idx, view) if params is None else params
    if p.device != images.device:  # pinned, so the copy does not wait for the GPU
        p = (p.pin_memory() if images.is_cuda else p).to(images.device, non_blocking=True)
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


class LoaderAugment:
    """The loader-side path: runs in DataLoader workers, one sample at a time.

    ``sample`` decodes one shard sample and crops and colour-jitters it to ``size``. Output
    equals :func:`augment` with the same (seed, epoch, idx) up to rounding and resampling; it
    is uint8, so ``normalize`` it on the device before the model."""

    def __init__(self, cfg: AugmentConfig, seed: int, epoch: int, size: int, channels: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.cfg, self.seed, self.epoch = cfg, seed, epoch
        self.size, self.channels = size, channels

    def sample(self, sample: dict) -> tuple[torch.Tensor, int, int] | None:
        """→ (uint8 [C, s, s] crop, idx, cls), None if the image is bad."""
        idx = int(sample["idx"]) if "idx" in sample else int(sample["__key__"])
        cls = int(sample["cls"]) if "cls" in sample else -1
        row = _params(self.cfg, self.seed, self.epoch, np.array([idx]), 0)[0].tolist()
        s = self.size
        # Decode a JPEG only as large as the crop still needs (DCT scaling).
        draft = (math.ceil(s / row[0]), math.ceil(s / row[1]))
        try:
            im = open_image(image_field(sample), self.channels, draft)
        except IMAGE_ERRORS:
            return None
        cv2 = _cv2()
        a = np.asarray(im)  # [H, W, 3] or [H, W] (mode L)
        v = _colour_cv(cv2, _crop_cv(cv2, a, row, s), row)
        v = v[:, :, None] if v.ndim == 2 else v
        return torch.from_numpy(v).permute(2, 0, 1), idx, cls


def _cv2() -> Any:
    """OpenCV, single-threaded: it runs inside loader workers, one image at a time, and its
    own thread pool would only compete with the other workers."""
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
        cv2.ocl.setUseOpenCL(False)
    return cv2


def _crop_cv(cv2: Any, a: np.ndarray, row: list[float], s: int) -> np.ndarray:
    """One view's crop, rotation and flip of ``a`` ([H, W, C] or [H, W] uint8) → [s, s(, C)]:
    the device path's affine grid (:func:`augment`) as one ``cv2.warpAffine``, bilinear, zeros
    outside the image as ``grid_sample``'s padding. A crop that still shrinks after the JPEG
    draft (by more than 10 %) is first area-averaged (``cv2.INTER_AREA``) to about the output
    scale, so that bilinear sampling does not alias (what Pillow's antialiased resize did)."""
    sx, sy, angle, tx, ty, flip = row[:6]
    h, w = a.shape[:2]
    shrink = min(1.0, s / (sx * w), s / (sy * h))  # output px per source px, ≤ 1
    if shrink < 0.9:
        size = (max(1, round(w * shrink)), max(1, round(h * shrink)))
        a = cv2.resize(a, size, interpolation=cv2.INTER_AREA)
        h, w = a.shape[:2]
    cos, sin = math.cos(angle), math.sin(angle)
    # Output pixel j has grid coordinate u = (2j + 1)/s − 1; the device theta maps (u, v) to
    # input coordinates x = sx cos f u − sy sin v + tx, y = sx sin f u + sy cos v + ty, and
    # x ∈ [−1, 1] is pixel (x + 1) w/2 − 1/2 (align_corners=False). Composed: src = M @ [j, i, 1].
    lin = np.array([[sx * cos * flip, -sy * sin], [sx * sin * flip, sy * cos]])
    half = np.array([w / 2.0, h / 2.0])
    m = np.empty((2, 3))
    m[:, :2] = half[:, None] * lin * (2.0 / s)
    m[:, 2] = half * (lin @ np.full(2, 1.0 / s - 1.0) + (tx, ty) + 1.0) - 0.5
    return cv2.warpAffine(
        a,
        m,
        (s, s),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


_RAMP = np.arange(256, dtype=np.float64)


def _lut(gain: float, offset: float) -> np.ndarray:
    """uint8 table of clamp(round(gain · v + offset)) for v = 0..255."""
    return np.clip(np.rint(_RAMP * gain + offset), 0, 255).astype(np.uint8)


def _colour_cv(cv2: Any, a: np.ndarray, row: list[float]) -> np.ndarray:
    """:func:`colour` for one uint8 image ([s, s, 3] RGB or [s, s]) with OpenCV: brightness
    and contrast as lookup tables, saturation as a weighted sum with the luma, grayscale as
    the luma; each step rounds to uint8 (within a grey level or two of the float version)."""
    rgb = a.ndim == 3
    if row[6] > 0:
        a = cv2.LUT(a, _lut(row[7], 0.0))  # brightness: blend with black
        grey = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY) if rgb else a
        c = row[8]  # contrast: blend with the mean of the grayscale image
        a = cv2.LUT(a, _lut(c, (1.0 - c) * cv2.mean(grey)[0]))
        if rgb:  # saturation: blend with the grayscale image
            grey3 = cv2.cvtColor(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            a = cv2.addWeighted(a, row[9], grey3, 1.0 - row[9], 0.0)
    if row[10] > 0 and rgb:
        a = cv2.cvtColor(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return a
