import torch

from selfclust.augment import augment, normalize
from selfclust.config import AugmentConfig


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
