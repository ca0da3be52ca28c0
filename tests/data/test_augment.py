"""Augmentation: a pure function of (seed, epoch, idx, view); device and loader paths agree;
colour ops equal torchvision v2's."""

import io

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from selfclust.config import AugmentConfig
from selfclust.data.augment import LoaderAugment, _params, augment, colour, normalize
from tests.helpers.data import shared_data


def _images(n=6, c=3, s=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g)


def test_pure_function_of_seed_epoch_idx():
    x, idx, cfg = _images(), torch.arange(10, 16), AugmentConfig()
    a = augment(x, idx, cfg, seed=1, epoch=3)
    b = augment(x, idx, cfg, seed=1, epoch=3)
    assert torch.equal(a, b)
    # the same sample in another batch position (another rank/worker) gets the same crop
    perm = torch.tensor([3, 1, 5, 0, 2, 4])
    c = augment(x[perm], idx[perm], cfg, seed=1, epoch=3)
    assert torch.allclose(c, a[perm], atol=1e-6)
    assert not torch.allclose(augment(x, idx, cfg, seed=1, epoch=4), a)
    assert not torch.allclose(augment(x, idx, cfg, seed=2, epoch=3), a)


def test_identity_settings_equal_normalize():
    cfg = AugmentConfig(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0, jitter_p=0, grayscale=0
    )
    x = _images()
    assert torch.allclose(augment(x, torch.arange(6), cfg, 0, 0), normalize(x), atol=1e-4)


def test_flip_and_grayscale_and_size():
    x = _images(c=3)
    flip = AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), hflip=1, jitter_p=0, grayscale=0)
    out = augment(x, torch.arange(6), flip, 0, 0)
    assert torch.allclose(out, normalize(x).flip(-1), atol=1e-4)
    gray = AugmentConfig(grayscale=1.0)
    g = augment(x, torch.arange(6), gray, 0, 0, size=8)
    assert g.shape == (6, 3, 8, 8)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])


def _cifar(n=48) -> torch.Tensor:
    with np.load(shared_data("cifar10_test_jpeg/cifar10_test_2k.npz")) as d:
        return torch.from_numpy(d["x"][:n]).permute(0, 3, 1, 2).contiguous()


def test_colour_equals_torchvision_v2_per_sample():
    x = _cifar().float() / 255
    idx = torch.arange(500, 500 + len(x))
    cfg = AugmentConfig(grayscale=0.4, jitter_p=0.7)
    p = torch.from_numpy(_params(cfg, 1, 2, idx.numpy(), 0)).float()
    assert 0 < int((p[:, 6] > 0).sum()) < len(x) and 0 < int((p[:, 10] > 0).sum()) < len(x)
    ref = []
    for k in range(len(x)):  # the oracle: torchvision's own functional ops, one image at a time
        y = x[k]
        if p[k, 6] > 0:
            y = TF.adjust_brightness(y, float(p[k, 7]))
            y = TF.adjust_contrast(y, float(p[k, 8]))
            y = TF.adjust_saturation(y, float(p[k, 9]))
        if p[k, 10] > 0:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        ref.append(y)
    assert torch.allclose(colour(x.clone(), p), torch.stack(ref), atol=1e-5)


def _samples(images: torch.Tensor, idx: torch.Tensor) -> list[dict]:
    out = []
    for a, i in zip(images.permute(0, 2, 3, 1).numpy(), idx.tolist(), strict=True):
        buf = io.BytesIO()
        Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).save(buf, format="PNG")
        out.append({"__key__": f"{i:09d}", "png": buf.getvalue(), "idx": str(i)})
    return out


def _loader_path(images, idx, cfg, seed, epoch, size):
    aug = LoaderAugment(cfg, seed, epoch, size, images.shape[1])
    return torch.stack([aug.sample(s)[0] for s in _samples(images, idx)])


def test_loader_path_equals_device_path():
    x = _cifar()
    idx = torch.arange(100, 100 + len(x))
    still = AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), grayscale=0.3)
    # No resampling: the loader's colour ops round to uint8 after each step, so they stay
    # within a couple of grey levels of the float ones.
    diff = normalize(_loader_path(x, idx, still, 3, 2, 32)) - augment(x, idx, still, 3, 2, 32)
    assert diff.abs().max() * _STD_255 < 3 and diff.abs().mean() * _STD_255 < 0.6
    # Random crops, flips, rotations, jitter, upscaled: the same affine map and decisions, so
    # only that rounding and bilinear rounding differ. Another epoch's crops are far off.
    for cfg, size in [(AugmentConfig(), 32), (AugmentConfig(rotation=15), 48)]:
        diff = normalize(_loader_path(x, idx, cfg, 3, 2, size)) - augment(x, idx, cfg, 3, 2, size)
        assert diff.abs().max() * _STD_255 < 8 and diff.abs().mean() * _STD_255 < 0.8
    cfg = AugmentConfig()
    other_epoch = normalize(_loader_path(x, idx, cfg, 3, 3, 32)) - augment(x, idx, cfg, 3, 2, 32)
    assert other_epoch.abs().mean() > 50 * diff.abs().mean()


def test_loader_path_shrinking_crop_is_area_averaged():
    """A crop that shrinks is averaged, not point-sampled: shrinking a whole image 4× (no
    jitter, flip or grayscale) equals the mean of each 4 × 4 block, Pillow's BOX reduction
    (bilinear sampling alone would average only the middle 2 × 2)."""
    x = _cifar(8)
    whole = AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), hflip=0, jitter_p=0, grayscale=0)
    out = _loader_path(x, torch.arange(8), whole, 0, 0, 8)
    ref = torch.stack([
        torch.from_numpy(np.array(Image.fromarray(a).reduce(4))).permute(2, 0, 1)
        for a in x.permute(0, 2, 3, 1).numpy()
    ])  # fmt: skip
    assert out.shape == (8, 3, 8, 8)
    assert (out.int() - ref.int()).abs().max() <= 1
    # Point sampling (the device path, no antialiasing) is further from the block means.
    point = augment(x, torch.arange(8), whole, 0, 0, 8)
    assert (normalize(out) - normalize(ref)).abs().mean() < (point - normalize(ref)).abs().mean()


_STD_255 = 0.25 * 255  # standardised units → grey levels


def test_loader_path_pure():
    x = _cifar(12)
    idx = torch.arange(7, 19)
    cfg = AugmentConfig()
    one = _loader_path(x, idx, cfg, 0, 1, 24)
    assert one.shape == (12, 3, 24, 24) and one.dtype == torch.uint8
    perm = torch.tensor([5, 3, 1, 0, 2, 4, 11, 10, 9, 8, 7, 6])
    assert torch.equal(_loader_path(x[perm], idx[perm], cfg, 0, 1, 24), one[perm])
    assert (normalize(one) - augment(x, idx, cfg, 0, 1, 24)).abs().mean() * _STD_255 < 2.5


def test_grayscale_images_through_loader_path():
    g = torch.randint(
        0, 256, (4, 1, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    out = _loader_path(g, torch.arange(4), AugmentConfig(), 0, 0, 16)
    assert out.shape == (4, 1, 16, 16)
    bad = LoaderAugment(AugmentConfig(), 0, 0, 16, 1)
    assert bad.sample({"__key__": "000000001", "png": b"garbage", "idx": "1"}) is None
