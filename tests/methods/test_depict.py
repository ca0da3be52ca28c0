"""DEPICT: target and loss against float64 numpy transcriptions of the paper (eqs. 7 and 9) and
of the authors' code (q ∝ p² / Σp, hidden layers' reconstruction × 0.1), the three pathways of
the network, and the column sums on 2 gloo ranks against one process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from selfclust.methods import depict as D
from tests.helpers.data import digits

pytestmark = pytest.mark.usefixtures("one_thread")


def np_target(p: np.ndarray) -> np.ndarray:
    """Eq. 7, literally: q_ik = (p_ik / (Σ_i' p_i'k)^½) / Σ_k' (p_ik' / (Σ_i' p_i'k')^½)."""
    n, k = p.shape
    q = np.zeros_like(p)
    for i in range(n):
        for c in range(k):
            q[i, c] = p[i, c] / np.sqrt(sum(p[j, c] for j in range(n)))
        q[i] /= q[i].sum()
    return q


def np_target_code(p: np.ndarray) -> np.ndarray:
    """The authors' code: y = p² / (column sums of p), then each row normalised."""
    q = p**2 / p.sum(0)
    return (q.T / q.sum(1)).T


def softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_balanced_target_matches_eq_7() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(23, 6, generator=g, dtype=torch.float64) * 3
    logits[:, 2] -= 20  # a cluster almost nobody prefers must not blow up
    p = torch.softmax(logits, 1)
    q = D.balanced_target(p, D.column_sums(p, group=None), power=1.0)
    ref = np_target(p.numpy())
    assert np.allclose(q.numpy(), ref, rtol=1e-12, atol=1e-300)
    # balancing: the rare cluster's share grows, the common ones' shrink
    assert q[:, 2].sum() > p[:, 2].sum()
    with pytest.raises(ValueError, match="positive"):
        D.balanced_target(p, torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="power"):
        D.balanced_target(p, D.column_sums(p, group=None), power=0.0)


def test_default_target_is_the_authors_code() -> None:
    """Power 2 (the default) equals p² / Σp row-normalised, and sharpens: every row's
    largest entry is at least its eq. 7 value."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(31, 7, generator=g, dtype=torch.float64) * 2
    logits[:, 4] -= 15
    p = torch.softmax(logits, 1)
    sums = D.column_sums(p, group=None)
    q = D.balanced_target(p, sums)
    assert np.allclose(q.numpy(), np_target_code(p.numpy()), rtol=1e-10, atol=1e-300)
    eq7 = D.balanced_target(p, sums, power=1.0)
    assert bool((q.max(1).values >= eq7.max(1).values - 1e-12).all())


def random_output(b: int = 5, k: int = 4, seed: int = 1) -> D.DEPICTOutput:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    clean = [r(b, 1, 8, 8), r(b, 7, 4, 4), r(b, 6, 2, 2), r(b, 10)]
    recon = [r(b, 1, 8, 8), r(b, 7, 4, 4), r(b, 6, 2, 2)]
    return D.DEPICTOutput(r(b, k), r(b, k), clean, recon)


@pytest.mark.parametrize("hidden_weight", [1.0, 0.1])
def test_loss_matches_eq_9(hidden_weight: float) -> None:
    """Eq. 9 as printed (every layer weight 1) and the authors' code (hidden layers × 0.1)."""
    out = random_output()
    p_clean = torch.softmax(out.clean_logits, 1)
    q = D.balanced_target(p_clean, D.column_sums(p_clean, None))
    loss = D.depict_loss(out, q, hidden_weight)
    n = out.noisy_logits.shape[0]
    p_noisy = softmax(out.noisy_logits.numpy())
    qn = q.numpy()
    ce = -sum(qn[i, c] * np.log(p_noisy[i, c]) for i in range(n) for c in range(qn.shape[1])) / n
    rec = 0.0
    for i in range(n):
        for layer, (z, zh) in enumerate(zip(out.clean[:-1], out.reconstructions, strict=True)):
            zi, zhi = z[i].numpy().ravel(), zh[i].numpy().ravel()
            w = 1.0 if layer == 0 else hidden_weight
            rec += w * np.sum((zi - zhi) ** 2) / zi.size  # ‖z_i^l − ẑ_i^l‖² / |z_i^l|
    rec /= n
    assert float(loss.clustering) == pytest.approx(ce, rel=1e-6)  # log-softmax in float32
    assert float(loss.reconstruction) == pytest.approx(rec, rel=1e-6)
    assert float(loss.total) == pytest.approx(ce + rec, rel=1e-6)


@pytest.mark.parametrize("size", [8, 16, 28, 32])
def test_pathways_shapes_and_noise(size: int) -> None:
    torch.manual_seed(0)
    net = D.DEPICTNet(D.ConvAutoencoder(1, size, dropout=0.3), clusters=10)
    x = torch.rand(4, 1, size, size)
    out = net(x)
    assert len(out.clean) == 4 and len(out.reconstructions) == 3
    for z, zh in zip(out.clean[:-1], out.reconstructions, strict=True):
        assert z.shape == zh.shape
    assert out.clean[0] is x or torch.equal(out.clean[0], x)  # z⁰ is the clean input
    assert float(out.clean[-1].detach().abs().max()) < 1  # the embedding is tanh
    assert torch.equal(out.clean_logits, net.clean_logits(x))  # clean path is deterministic
    assert not torch.allclose(out.noisy_logits, out.clean_logits)  # dropout on the noisy path
    net.ae.dropout = 0.0
    quiet = net(x)
    assert torch.allclose(quiet.noisy_logits, quiet.clean_logits)
    with pytest.raises(ValueError, match="too small"):
        D.ConvAutoencoder(1, 2, channels=(8, 8), kernels=(4, 4))


def test_target_is_a_constant_for_the_loss() -> None:
    """Gradients come from the noisy predictions (and the reconstruction), never through the
    target, even when a caller forgets to detach it."""
    torch.manual_seed(0)
    net = D.DEPICTNet(D.ConvAutoencoder(1, 8, dropout=0.0), clusters=5)
    x = torch.rand(6, 1, 8, 8)
    grads = []
    for detach in (False, True):
        net.zero_grad()
        out = net(x)
        target = torch.softmax(out.clean_logits, 1)
        D.depict_loss(out, target.detach() if detach else target).clustering.backward()
        grads.append(net.head.weight.grad.clone())  # type: ignore[union-attr]
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1])


def _ranks(rank: int, world: int, p: torch.Tensor) -> dict:
    from selfclust.collectives import WORLD

    idx = torch.arange(rank, len(p), world)
    sums = D.column_sums(p[idx], WORLD)
    return {"sums": sums, "q": D.balanced_target(p[idx], sums), "idx": idx}


def test_column_sums_two_ranks_equal_one(tmp_path: Path) -> None:
    from tests.helpers.spawn import run_ranks

    x = torch.from_numpy(digits()[0].reshape(-1, 64).astype(np.float32) / 16)
    torch.manual_seed(0)
    p = torch.softmax(x @ torch.randn(64, 10), 1)  # real-data-driven predictions
    single = _ranks(0, 1, p)
    q = torch.empty_like(single["q"])
    for r in run_ranks(_ranks, 2, tmp_path, p):
        assert torch.allclose(r["sums"], single["sums"], rtol=1e-12)
        q[r["idx"]] = r["q"]
    assert torch.allclose(q, single["q"], rtol=1e-12)


def test_signed_pixels_and_bounded_decoder() -> None:
    """method.pixels=signed: inputs in [-1, 1] (the authors' scaling), the decoder's last layer
    tanh-bounded like them, and the label pass's standardised images map to the same inputs."""
    from selfclust.config import load_config
    from selfclust.data.augment import normalize
    from selfclust.methods.nets import build_cluster_net

    cfg = load_config(None, ["method.name=depict", "method.pixels=signed"])
    net = build_cluster_net(cfg, 1, 28).eval()
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    x = net.inputs(images)
    assert torch.allclose(x, images.float() / 127.5 - 1, atol=1e-6)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.allclose(net.backbone(normalize(images)), net.features(x), atol=1e-5)
    out = net.net(x)
    assert float(out.reconstructions[0].detach().abs().max()) < 1  # tanh on ẑ⁰
    unit = build_cluster_net(load_config(None, ["method.name=depict"]), 1, 28)
    assert not unit.net.ae.bounded_output  # [0, 1] and standardised pixels: a linear ẑ⁰


def test_noisy_input_feeds_only_the_noisy_path() -> None:
    """``net(x, noisy_input)``: the noisy encoder (and so the predictions and the decoder's
    code) reads the augmented input; the clean layers, the targets' logits and what the
    decoder must reconstruct stay those of ``x``."""
    torch.manual_seed(0)
    net = D.DEPICTNet(D.ConvAutoencoder(1, 16, dropout=0.0), clusters=10)
    x, other = torch.rand(2, 4, 1, 16, 16)
    out = net(x, other)
    plain = net(x)
    assert torch.equal(out.clean_logits, plain.clean_logits)
    for z, z_plain in zip(out.clean, plain.clean, strict=True):
        assert torch.equal(z, z_plain)
    assert torch.allclose(out.noisy_logits, net.clean_logits(other))  # dropout 0: same path
    code = net.ae.encode(other, noisy=False)[-1]
    for r, r_other in zip(out.reconstructions, net.ae.decode(code), strict=True):
        assert torch.allclose(r, r_other)
    assert not torch.allclose(out.noisy_logits, plain.noisy_logits)


@pytest.mark.parametrize("pixels", ["unit", "signed", "standardized"])
def test_augmented_inputs_in_the_nets_pixel_convention(pixels: str) -> None:
    """method.noise_augment's view: with an identity transformation it is exactly what
    ``inputs`` gives the clean path, in each pixel convention; with a rotation it differs,
    and depends only on (seed, epoch, sample index), not on the batch it comes in."""
    from selfclust.config import AugmentConfig, load_config
    from selfclust.methods.nets import build_cluster_net

    cfg = load_config(None, ["method.name=depict", f"method.pixels={pixels}"])
    net = build_cluster_net(cfg, 1, 8)
    images = torch.from_numpy((digits()[0][:32].astype(np.int64) * 255 // 16).astype(np.uint8))
    images = images.reshape(-1, 1, 8, 8)
    idx = torch.arange(100, 132)
    off = dict(hflip=0, jitter=0, jitter_p=0, grayscale=0)
    same = AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1), **off)
    torch.testing.assert_close(
        net.augmented_inputs(images, idx, same, 0, 0), net.inputs(images), atol=1e-5, rtol=0
    )
    turn = AugmentConfig(crop_scale=(0.8, 1), crop_ratio=(0.9, 1.1), rotation=15, **off)
    view = net.augmented_inputs(images, idx, turn, 0, 3)
    assert (view - net.inputs(images)).abs().amax(dim=(1, 2, 3)).min() > 0.01
    lo, hi = {"unit": (0, 1), "signed": (-1, 1), "standardized": (-2, 2)}[pixels]
    assert float(view.min()) >= lo - 1e-6 and float(view.max()) <= hi + 1e-6
    part = net.augmented_inputs(images[5:9], idx[5:9], turn, 0, 3)
    torch.testing.assert_close(part, view[5:9])
    assert not torch.allclose(net.augmented_inputs(images, idx, turn, 0, 4), view)
