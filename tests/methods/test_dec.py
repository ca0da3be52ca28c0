"""DEC: formulas against a float64 numpy transcription of the paper, the paper's gradients,
2 gloo ranks against one process. The short run that beats pixel k-means goes through the
trainer: tests/methods/test_runner.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from selfclust.methods import dec
from selfclust.methods.autoencoder import MLPAutoencoder, denoising_loss, mlp
from tests.helpers.data import digits

pytestmark = pytest.mark.usefixtures("one_thread")


def np_q(z: np.ndarray, mu: np.ndarray, alpha: float) -> np.ndarray:
    """Eq. 1, literally."""
    q = np.zeros((len(z), len(mu)))
    for i in range(len(z)):
        for j in range(len(mu)):
            q[i, j] = (1 + np.sum((z[i] - mu[j]) ** 2) / alpha) ** (-(alpha + 1) / 2)
    return q / q.sum(1, keepdims=True)


def np_p(q: np.ndarray) -> np.ndarray:
    """Eq. 3 with f_j = Σ_i q_ij over all rows."""
    w = q**2 / q.sum(0)[None, :]
    return w / w.sum(1, keepdims=True)


def small(seed: int = 0, n: int = 37, k: int = 5, d: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(
        k, d, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_soft_assignment_target_and_loss_match_the_paper(alpha: float) -> None:
    z, mu = small()
    z[3] = mu[1]  # a point exactly on a centroid
    log_q = dec.student_t_log_q(z, mu, alpha)
    q_ref = np_q(z.numpy(), mu.numpy(), alpha)
    assert np.allclose(log_q.exp().numpy(), q_ref, rtol=1e-12, atol=1e-14)
    f = dec.soft_frequencies(log_q.exp(), group=None)
    assert np.allclose(f.numpy(), q_ref.sum(0), rtol=1e-12)
    log_p = dec.target_log_p(log_q, f)
    p_ref = np_p(q_ref)
    assert np.allclose(log_p.exp().numpy(), p_ref, rtol=1e-10)
    kl_ref = np.sum(p_ref * np.log(p_ref / q_ref)) / len(z)  # eq. 2, per sample
    assert float(dec.kl_loss(log_p, log_q)) == pytest.approx(kl_ref, rel=1e-10)


def test_gradients_are_the_papers_eq_4_and_5() -> None:
    z, mu = small(1)
    z.requires_grad_(True)
    mu.requires_grad_(True)
    alpha = 1.0
    log_q = dec.student_t_log_q(z, mu, alpha)
    log_p = dec.target_log_p(log_q, dec.soft_frequencies(log_q.exp(), None))
    (dec.kl_loss(log_p, log_q) * len(z)).backward()  # the paper's L sums over i
    zn, mun = z.detach().numpy(), mu.detach().numpy()
    q, p = np_q(zn, mun, alpha), log_p.exp().numpy()
    diff = zn[:, None, :] - mun[None, :, :]  # [n, K, d] z_i − μ_j
    kern = 1 / (1 + (diff**2).sum(-1) / alpha)  # (1 + ‖z_i − μ_j‖²/α)^-1
    coef = (alpha + 1) / alpha * kern * (p - q)  # [n, K]
    dz = (coef[:, :, None] * diff).sum(1)
    dmu = -(coef[:, :, None] * diff).sum(0)
    assert z.grad is not None and mu.grad is not None
    assert np.allclose(z.grad.numpy(), dz, rtol=1e-9, atol=1e-12)
    assert np.allclose(mu.grad.numpy(), dmu, rtol=1e-9, atol=1e-12)


def test_far_centroid_and_bad_input() -> None:
    z = torch.zeros(3, 2)
    mu = torch.tensor([[0.0, 0.0], [1e18, 1e18]])
    log_q = dec.student_t_log_q(z, mu)
    assert torch.isfinite(log_q).all() and torch.allclose(log_q[:, 0].exp(), torch.ones(3))
    assert torch.isfinite(dec.target_log_p(log_q, torch.tensor([3.0, 1e-30]))).all()
    with pytest.raises(ValueError, match="alpha"):
        dec.student_t_log_q(z, mu, alpha=0)
    with pytest.raises(ValueError, match="3-d but centroids 2-d"):
        dec.student_t_log_q(torch.zeros(2, 3), mu)
    with pytest.raises(ValueError, match="positive"):
        dec.target_log_p(log_q, torch.tensor([1.0, 0.0]))


def test_stop_rule_and_state() -> None:
    rule = dec.StopRule(tol=0.001)
    assert not rule.update(0.01)
    assert rule.update(0.0005)
    again = dec.StopRule()
    again.load_state_dict(rule.state_dict())
    assert again.stopped and again.last_change == 0.0005


def test_autoencoder_shapes_and_denoising_loss() -> None:
    ae = MLPAutoencoder(64, 10)
    assert [m.out_features for m in ae.encoder if isinstance(m, torch.nn.Linear)] == [
        500,
        500,
        2000,
        10,
    ]
    out = ae(torch.rand(5, 1, 8, 8))
    assert out.embedding.shape == (5, 10) and out.reconstruction.shape == (5, 64)
    x = torch.rand(5, 64)
    with torch.no_grad():
        loss, _ = denoising_loss(ae, x, dropout=0.0)
        assert float(loss) == pytest.approx(float(((ae(x).reconstruction - x) ** 2).mean()))
    net = dec.DECNet(ae, clusters=7)
    full = net(torch.rand(5, 64))
    assert full.log_q.shape == (5, 7)
    assert torch.allclose(full.log_q.exp().sum(1), torch.ones(5))
    with pytest.raises(ValueError, match="two positive widths"):
        mlp([5])


def _ranks(rank: int, world: int, x: torch.Tensor) -> dict:
    """Rank r holds rows r, r+world, … (interleaved, as shards would split them)."""
    from selfclust.collectives import WORLD
    from selfclust.labels.sample import sample_pool

    idx = torch.arange(rank, len(x), world)
    pool = sample_pool(x[idx], idx, len(x), 1000, 0, WORLD)  # DEC's first partition's sample
    mu = dec.best_centroids(pool, 10, restarts=3, seed=0, group=WORLD)
    log_q = dec.student_t_log_q(x[idx].double(), mu.double())
    f = dec.soft_frequencies(log_q.exp(), WORLD)
    return {"mu": mu, "f": f, "log_p": dec.target_log_p(log_q, f), "idx": idx}


def test_global_statistics_two_ranks_equal_one(tmp_path: Path) -> None:
    from tests.helpers.spawn import run_ranks

    x = torch.from_numpy(digits()[0].reshape(-1, 64).astype(np.float32) / 16)
    single = _ranks(0, 1, x)
    results = run_ranks(_ranks, 2, tmp_path, x)
    for r in results:
        assert torch.equal(r["mu"], single["mu"])  # same pool, same faiss runs, same pick
        assert torch.allclose(r["f"], single["f"], rtol=1e-12)
    log_p = torch.empty_like(single["log_p"])
    for r in results:
        log_p[r["idx"]] = r["log_p"]
    assert torch.allclose(log_p, single["log_p"], atol=1e-12)
