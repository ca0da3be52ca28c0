"""DGG: the VaDE-style ELBO against a numpy transcription and a Monte-Carlo estimate, the GMM
M-step, the k-NN graph against sklearn, JS against scipy, the distributed statistics / graph /
neighbour fetch on 2 gloo ranks against one process. The short run that beats pixel k-means
goes through the trainer: tests/methods/test_runner.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from scipy.stats import norm
from sklearn.neighbors import NearestNeighbors

from selfclust.methods import dgg, graph
from tests.helpers.data import digits as load_digits

pytestmark = pytest.mark.usefixtures("one_thread")


def digits() -> tuple[torch.Tensor, np.ndarray]:
    x, y = load_digits()
    return torch.from_numpy(x.reshape(-1, 64).astype(np.float32) / 16), y


def setup_elbo(b: int = 6, k: int = 3, m: int = 2, dim: int = 5) -> tuple:
    g = torch.Generator().manual_seed(0)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, dtype=torch.float64)

    prior = dgg.GaussianMixturePrior(k, m).double()
    with torch.no_grad():
        prior.pi_logits.copy_(r(k))
        prior.mean.copy_(r(k, m))
        prior.log_var.copy_(0.3 * r(k, m))
    out = dgg.VAEOutput(r(b, m), 0.5 * r(b, m), r(b, m), r(b, dim), r(b, k))
    x = torch.rand(b, dim, generator=g, dtype=torch.float64)
    return x, out, F.log_softmax(out.posterior_logits, 1), prior


def test_neg_elbo_matches_the_vade_formula() -> None:
    x, out, log_gamma, prior = setup_elbo()
    ours = dgg.neg_elbo(x, out, log_gamma, prior).detach().numpy()
    xn, lg = x.numpy(), out.recon_logits.numpy()
    mu_t, lv_t = out.mean.numpy(), out.log_var.numpy()
    gam = log_gamma.exp().numpy()
    pi = torch.softmax(prior.pi_logits, 0).detach().numpy()
    mu_c, var_c = prior.mean.detach().numpy(), prior.log_var.exp().detach().numpy()
    s = 1 / (1 + np.exp(-lg))
    for i in range(len(xn)):
        rec = -np.sum(xn[i] * np.log(s[i]) + (1 - xn[i]) * np.log(1 - s[i]))
        kl_z = 0.0
        for c in range(len(pi)):
            kl_z += (
                0.5
                * gam[i, c]
                * np.sum(
                    np.log(var_c[c])
                    + np.exp(lv_t[i]) / var_c[c]
                    + (mu_t[i] - mu_c[c]) ** 2 / var_c[c]
                )
            )
        kl_z -= 0.5 * np.sum(1 + lv_t[i])
        kl_c = np.sum(gam[i] * np.log(gam[i] / pi))
        assert ours[i] == pytest.approx(rec + kl_z + kl_c, rel=1e-10)
    # inputs outside [0, 1] are refused unless the caller's pixels are unit by construction
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dgg.neg_elbo(x + 1, out, log_gamma, prior)
    unchecked = dgg.neg_elbo(x, out, log_gamma, prior, check_range=False).detach().numpy()
    assert np.array_equal(unchecked, ours)


def test_elbo_kl_terms_match_a_monte_carlo_estimate() -> None:
    """E_q[log q(z|x) + log q(c|x) − log p(z|c) − log p(c)] sampled with scipy's normal pdf."""
    x, out, log_gamma, prior = setup_elbo(b=2)
    rec = F.binary_cross_entropy_with_logits(out.recon_logits, x, reduction="none").sum(1)
    kl = (dgg.neg_elbo(x, out, log_gamma, prior) - rec).detach().numpy()
    rng = np.random.default_rng(0)
    mu_c, sd_c = prior.mean.detach().numpy(), (0.5 * prior.log_var).exp().detach().numpy()
    log_pi = torch.log_softmax(prior.pi_logits, 0).detach().numpy()
    for i in range(2):
        mean, sd = out.mean[i].numpy(), np.exp(0.5 * out.log_var[i].numpy())
        z = mean + sd * rng.standard_normal((200_000, len(mean)))
        log_q = norm.logpdf(z, mean, sd).sum(1)
        gam = log_gamma[i].exp().numpy()
        est = sum(
            gam[c] * np.mean(log_q - norm.logpdf(z, mu_c[c], sd_c[c]).sum(1))
            + gam[c] * (np.log(gam[c]) - log_pi[c])
            for c in range(len(gam))
        )
        assert kl[i] == pytest.approx(est, abs=0.02)


def test_m_step_and_responsibilities() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(40, 3, generator=g, dtype=torch.float64)
    gamma = torch.softmax(torch.randn(40, 4, generator=g, dtype=torch.float64), 1)
    pi, mean, var = dgg.gmm_parameters(dgg.gmm_statistics(z, gamma, None))
    zn, gn = z.numpy(), gamma.numpy()
    nk = gn.sum(0)
    ref_mean = gn.T @ zn / nk[:, None]
    ref_var = np.stack(
        [(gn[:, c : c + 1] * (zn - ref_mean[c]) ** 2).sum(0) / nk[c] for c in range(4)]
    )
    assert np.allclose(pi.numpy(), nk / 40) and np.allclose(mean.numpy(), ref_mean)
    assert np.allclose(var.numpy(), ref_var)
    prior = dgg.GaussianMixturePrior(4, 3)
    prior.load_statistics(dgg.gmm_statistics(z, gamma, None))
    resp = prior.double().responsibilities(z).detach().numpy()
    dens = np.stack(
        [pi[c].item() * norm.pdf(zn, ref_mean[c], np.sqrt(ref_var[c])).prod(1) for c in range(4)], 1
    )
    assert np.allclose(resp, dens / dens.sum(1, keepdims=True), rtol=1e-5)
    with pytest.raises(ValueError, match=r"cluster\(s\) \[2, 3\] have no members"):
        dgg.gmm_parameters(dgg.gmm_statistics(z, F.one_hot(torch.arange(40) % 2, 4).double(), None))


def test_js_graph_loss_and_weights() -> None:
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), 1)
    nb = torch.softmax(torch.randn(5, 3, 4, generator=g, dtype=torch.float64), 2)
    nb[0, 0] = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)  # zeros are fine
    w = torch.rand(5, 3, generator=g, dtype=torch.float64)
    ref = np.mean(
        [sum(w[i, j] * jensenshannon(p[i], nb[i, j]) ** 2 for j in range(3)) for i in range(5)]
    )
    assert float(graph.graph_loss(p, nb, w)) == pytest.approx(ref, rel=1e-9)
    d2 = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 0.0]])
    ref_w = np.exp(-np.array([1.0, 2.0, 4.0]) / 2.0)
    assert np.allclose(graph.similarity_weights(d2, sigma_rank=2)[0].numpy(), ref_w)
    assert torch.equal(graph.similarity_weights(d2)[1], torch.ones(3))  # duplicates: w = 1
    with pytest.raises(ValueError, match="sigma_rank"):
        graph.similarity_weights(d2, sigma_rank=4)


def test_knn_graph_equals_sklearn_on_digits() -> None:
    x, _ = digits()
    x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # no ties
    ours = graph.knn_graph(x, torch.arange(len(x)), 10, group=None)
    dist, ind = NearestNeighbors(n_neighbors=11).fit(x.numpy()).kneighbors(x.numpy())
    assert np.array_equal(ours.neighbours.numpy(), ind[:, 1:])
    assert np.allclose(ours.sq_distances.numpy(), dist[:, 1:] ** 2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="k < N"):
        graph.knn_graph(x[:5], torch.arange(5), 5, group=None)


def _ranks(rank: int, world: int, x: torch.Tensor, gamma: torch.Tensor, need: torch.Tensor) -> dict:
    from selfclust.collectives import WORLD

    idx = torch.arange(rank, len(x), world)
    stats = dgg.gmm_statistics(x[idx].double(), gamma[idx], WORLD)
    g = graph.knn_graph(x[idx], idx, 10, WORLD)
    mine = need[rank::world]  # different requests per rank, some of them unknown samples
    rows, found = graph.fetch_rows(mine, idx, gamma[idx].float(), WORLD)
    return {"stats": stats, "graph": g, "idx": idx, "rows": rows, "found": found, "need": mine}


def test_distributed_statistics_graph_and_fetch_two_ranks_equal_one(tmp_path: Path) -> None:
    from tests.helpers.spawn import run_ranks

    x, _ = digits()
    x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    gamma = torch.softmax(x[:, :10].double() * 3, 1)
    need = torch.randint(0, len(x), (300,), generator=torch.Generator().manual_seed(3))
    x_local, gamma_local = x[:1500], gamma[:1500]  # samples 1500.. are held by nobody
    single = _ranks(0, 1, x_local, gamma_local, need)
    results = run_ranks(_ranks, 2, tmp_path, x_local, gamma_local, need)
    neighbours = torch.empty_like(single["graph"].neighbours)
    for r in results:
        assert torch.allclose(r["stats"], single["stats"], rtol=1e-12)
        neighbours[r["idx"]] = r["graph"].neighbours
        assert torch.equal(r["found"], r["need"] < 1500)
        ok = r["need"][r["found"]]
        assert torch.equal(r["rows"][r["found"]], gamma[ok].float())
        assert (r["rows"][~r["found"]] == 0).all()
    assert torch.equal(neighbours, single["graph"].neighbours)
    assert torch.equal(single["found"], need < 1500)
