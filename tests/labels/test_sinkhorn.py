"""Tests for selfclust.labels.sinkhorn and its modules: oracles (POT, the float64 log-domain
reference of selfclust.labels.sinkhorn_reference), numerics, fused kernels, distributed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import selfclust.labels.sinkhorn as sk
from selfclust.collectives import WORLD
from selfclust.labels import sinkhorn_kernels as kernels
from selfclust.labels import sinkhorn_numba as sinkhorn_cpu
from selfclust.labels import sinkhorn_scalings as scalings
from selfclust.labels.sinkhorn import LinearLogits, SinkhornResult, sinkhorn_knopp
from selfclust.labels.sinkhorn_reference import log_sinkhorn_f64
from selfclust.labels.sinkhorn_relaxation import _OMEGA_MAX, _next_omega
from selfclust.threads import keep_torch_threads
from tests.helpers.data import digits
from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")


def plan(res: SinkhornResult, logits: torch.Tensor, lam: float) -> torch.Tensor:
    """Q [n, K] float64 rebuilt from the result, in terms of the original logits."""
    s = lam * logits.to(torch.float64)
    return (res.log_beta[:, None] + s + res.log_alpha[None, :]).exp()


def marginal_errors(q: torch.Tensor) -> tuple[float, float]:
    """(max relative row error, max relative column error) against 1/N and 1/K."""
    n, k = q.shape
    rows = (q.sum(1) * n - 1).abs().max().item()
    cols = (q.sum(0) * k - 1).abs().max().item()
    return rows, cols


def net_logits(n: int, k: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Logits of a small random MLP on a 10-component Gaussian mixture: structured, not iid."""
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(10, 32, generator=g)
    x = centers[torch.randint(0, 10, (n,), generator=g)] + torch.randn(n, 32, generator=g)
    w1 = torch.randn(32, 64, generator=g) / 32**0.5
    w2 = torch.randn(64, k, generator=g) / 64**0.5
    z = torch.relu(x @ w1) @ w2
    return scale * z / z.std()


def peaked_logits(n: int, k: int, seed: int) -> torch.Tensor:
    """Every sample prefers cluster 0 by a wide margin; no sample comes near cluster K-1."""
    z = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    z[:, 0] += 10.0
    z[:, -1] -= 10.0
    return z


# ---------------------------------------------------------------- oracles


def test_matches_pot_plan() -> None:
    ot = pytest.importorskip("ot")
    z = torch.randn(300, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lam, (n, k) = 8.0, z.shape
    q_pot = ot.sinkhorn(
        torch.full((n,), 1.0 / n, dtype=torch.float64),
        torch.full((k,), 1.0 / k, dtype=torch.float64),
        -z,
        1.0 / lam,
        numItermax=100000,
        stopThr=1e-12,
    )
    res = sinkhorn_knopp(z, lam, tol=1e-5, group=None)
    assert res.converged and res.error < 1e-5
    q = plan(res, z, lam)
    assert torch.allclose(q, q_pot, rtol=1e-3, atol=1e-3 / (n * k))
    assert torch.equal(res.labels, q_pot.argmax(dim=1))


@pytest.mark.parametrize("lam", [25.0, 50.0])
def test_matches_log_domain_oracle(lam: float) -> None:
    z = net_logits(5000, 30, seed=1)
    labels_ref, _ = log_sinkhorn_f64(z, lam, tol=1e-6)
    res = sinkhorn_knopp(z, lam, group=None)  # default tol 1e-3
    assert res.converged and res.error < 1e-3
    agree = (res.labels == labels_ref).double().mean().item()
    assert agree >= 0.999
    rows, cols = marginal_errors(plan(res, z, lam))
    assert rows < 1e-4 and cols < 1e-3 + 1e-4


def test_error_is_column_deviation_after_row_update() -> None:
    z = net_logits(2000, 16, seed=2)
    lam = 25.0
    for max_iters in (1, 3, 1000):
        res = sinkhorn_knopp(z, lam, tol=1e-4, max_iters=max_iters, group=None)
        rows, cols = marginal_errors(plan(res, z, lam))
        assert rows < 1e-5  # rows are exact
        assert abs(res.error - cols) < 1e-5 * max(1.0, cols)
        assert res.converged == (res.error < 1e-4)
    short = sinkhorn_knopp(z, lam, tol=1e-4, max_iters=3, group=None)
    assert short.iterations == 3 and not short.converged and short.error >= 1e-4
    assert res.converged and res.iterations < 1000


def confident_digit_logits() -> torch.Tensor:
    """Real data, confident scores: −||x − μ_c||² / 200 to the 10 class means of sklearn's
    digits (median top-2 margin 2.6, like a trained head). Plain Sinkhorn at λ = 25 is still
    0.4 % off after 1000 iterations here (classes of 174-183 samples must be evened out)."""
    dx, dy = digits()
    x = torch.from_numpy(dx.reshape(len(dx), -1)).double()
    y = torch.from_numpy(dy).long()
    mu = torch.stack([x[y == c].mean(0) for c in range(10)])
    return (-torch.cdist(x, mu).square() / 200).float()


@pytest.mark.parametrize("lam", [25.0, 50.0])
def test_confident_real_logits_converge(lam: float) -> None:
    z = confident_digit_logits()
    labels_ref, _ = log_sinkhorn_f64(z, lam, tol=1e-5, max_iters=100000)
    res = sinkhorn_knopp(z, lam, max_iters=1000, group=None)
    assert res.converged and res.error < 1e-3 and res.iterations < 400
    assert (res.labels == labels_ref).double().mean() >= 0.999
    rows, cols = marginal_errors(plan(res, z, lam))
    assert rows < 1e-5 and cols < 1e-3 + 1e-5


def test_over_relaxation_factor() -> None:
    for rho in (0.5, 0.9, 0.99, 0.999):
        best = 2 / (1 + math.sqrt(1 - rho))
        assert _next_omega(1.0, rho) == pytest.approx(min(best, _OMEGA_MAX))
        # Observed rate μ of SOR with ω < ω*: largest root of (μ + ω − 1)² = μ ω² ρ.
        w = 1 + (best - 1) / 2
        mu = (w * math.sqrt(rho) / 2 + math.sqrt(w * w * rho / 4 - w + 1)) ** 2
        assert _next_omega(w, mu) == pytest.approx(min(best, _OMEGA_MAX), rel=1e-9)
    assert _next_omega(1.8, 1.01) == pytest.approx(1.4)  # error grew: back off
    assert _next_omega(1.9, 0.85) == 1.9  # rate ≤ ω − 1: already at or above ω*


# ---------------------------------------------------------------- numerics


def test_near_uniform_logits_are_finite_and_balanced() -> None:
    n, k = 20000, 10
    z = 1e-4 * torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    res = sinkhorn_knopp(z, 25.0, group=None)
    assert res.converged
    assert torch.isfinite(res.log_alpha).all() and torch.isfinite(res.log_beta).all()
    q = plan(res, z, 25.0)
    assert ((q * n * k) - 1).abs().max() < 0.05  # the plan is near uniform
    # Labels follow the noise: cluster sizes are multinomial, N/K = 2000 ± 45 (1 sigma).
    sizes = torch.bincount(res.labels, minlength=k)
    assert ((sizes - n / k).abs() < 0.1 * n / k).all()


@pytest.mark.parametrize("ahead", [0.0, scalings._AHEAD])  # kernels built for where a is heading
@pytest.mark.parametrize("lam", [25.0, 50.0])
def test_peaked_logits_still_give_equal_clusters(
    lam: float, ahead: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scalings, "_AHEAD", ahead)
    n, k = 5000, 20
    z = peaked_logits(n, k, seed=4)
    # Float32 exp(λ (z − max)) of cluster K-1 underflows for every row (λ·20 ≫ 87).
    assert (lam * (z[:, -1] - z.amax(1)) < -104).all()
    res = sinkhorn_knopp(z, lam, group=None)
    assert res.converged and res.error < 1e-3
    assert torch.isfinite(res.log_alpha).all() and torch.isfinite(res.log_beta).all()
    assert res.rebuilds >= 1  # the shunned cluster's column underflows: P must be rebuilt
    assert res.log_alpha[0] < res.log_alpha[1:].min()  # the favourite is taxed
    assert res.log_alpha[-1] > res.log_alpha[:-1].max()  # the shunned one is subsidised
    sizes = torch.bincount(res.labels, minlength=k)
    assert ((sizes - n / k).abs() <= 0.05 * n / k).all()
    rows, cols = marginal_errors(plan(res, z, lam))
    assert rows < 1e-3 and cols < 1e-3 + 1e-3
    labels_ref, _ = log_sinkhorn_f64(z, lam, tol=1e-6)
    assert (res.labels == labels_ref).double().mean() >= 0.999


def test_constant_logits() -> None:
    z = torch.full((50, 5), 3.7)
    res = sinkhorn_knopp(z, 25.0, group=None)
    assert res.converged and res.iterations == 1 and res.error < 1e-6 and res.rebuilds == 0
    assert torch.allclose(plan(res, z, 25.0), torch.full((50, 5), 1 / 250, dtype=torch.float64))
    assert torch.allclose(res.log_alpha, res.log_alpha[0].expand(5))
    assert res.labels.dtype == torch.int64 and ((res.labels >= 0) & (res.labels < 5)).all()


def test_dtypes_and_input_untouched() -> None:
    z = net_logits(1000, 12, seed=5).to(torch.bfloat16)
    ref = sinkhorn_knopp(z.float(), 25.0, group=None)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        zz = z.to(dtype)
        before = zz.clone()
        res = sinkhorn_knopp(zz, 25.0, group=None)
        assert torch.equal(zz, before)
        assert res.labels.dtype == torch.int64 and res.log_alpha.dtype == torch.float64
        assert res.log_beta.dtype == torch.float64 and res.log_beta.shape == (1000,)
        assert (res.labels == ref.labels).double().mean() >= 0.999


def test_chunked_cpu_pass_and_check_every(monkeypatch: pytest.MonkeyPatch) -> None:
    z = peaked_logits(3000, 16, seed=6)
    whole = sinkhorn_knopp(z, 25.0, group=None)
    monkeypatch.setattr(kernels, "_CHUNK_BYTES", 1)  # 64-row chunks (the floor), last one partial
    chunked = sinkhorn_knopp(z, 25.0, group=None)
    assert chunked.iterations == whole.iterations
    assert torch.equal(chunked.labels, whole.labels)
    assert torch.allclose(chunked.log_alpha, whole.log_alpha, atol=1e-4)
    sparse = sinkhorn_knopp(z, 25.0, check_every=7, group=None)
    assert sparse.converged and sparse.error < 1e-3
    assert (sparse.labels == whole.labels).double().mean() >= 0.999


def test_non_finite_rows_raise_with_count() -> None:
    z = torch.randn(20, 4)
    z[3, 1] = float("nan")
    z[7, 2] = float("inf")
    z[9] = -float("inf")
    with pytest.raises(ValueError, match=r"3 row\(s\) with NaN or inf \(of 20\)"):
        sinkhorn_knopp(z, 25.0, group=None)


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"K=5 clusters > N=3 samples"):
        sinkhorn_knopp(torch.zeros(3, 5), 25.0, group=None)
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_knopp(torch.zeros(10), 25.0, group=None)
    with pytest.raises(ValueError, match="K >= 2"):
        sinkhorn_knopp(torch.zeros(10, 1), 25.0, group=None)
    for lam in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam"):
            sinkhorn_knopp(torch.zeros(10, 2), lam, group=None)
    with pytest.raises(ValueError, match="floating point"):
        sinkhorn_knopp(torch.zeros(10, 2, dtype=torch.int64), 25.0, group=None)


# ---------------------------------------------------------------- fused CPU kernels (numba)


def _both_kernels(z: torch.Tensor, la0: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(P, M) built by torch and by the fused kernel with 3 uneven row tasks."""
    z_max = z.amax(1)
    return [kernels._build_kernel(z, z_max, 25.0, la0, None, threads)[:2] for threads in (0, 3)]


@pytest.mark.parametrize("n", [0, 1797])
def test_numba_kernels_match_torch(n: int) -> None:
    """Real-ish block (digits' confident scores, K = 10; K = 50 below): same kernel, same rows
    and column sums within float32 rounding, checked against float64 products of the inputs."""
    for z in (confident_digit_logits()[:n], net_logits(3001, 50, seed=10)[: n + 3 * (n > 0)]):
        rows, k = z.shape  # 1797 and 1800 rows: not multiples of the 256-row flush or 3 tasks
        la0 = torch.linspace(-3.0, 0.0, k, dtype=torch.float64)
        (p_t, m_t), (p_n, m_n) = _both_kernels(z, la0)
        assert torch.equal(m_t, m_n)
        assert torch.equal(p_t > 0, p_n > 0)  # same entries dropped below e^-87
        assert torch.allclose(p_n, p_t, rtol=4e-7, atol=0.0)
        # The fused build also does the first sweep on the new kernel (given a, ω = 1, check).
        b_f, ex_f, b_s, ex_s = (torch.zeros(rows) for _ in range(4))
        a1 = torch.linspace(-60.0, 0.0, k).exp()
        built = kernels._build_kernel(z, z.amax(1), 25.0, la0, None, 3, (b_f, ex_f, 1 / 2000, a1))
        c_f = built[2]
        c_s = kernels._sweep(p_n, a1, b_s, ex_s, 1 / 2000, 1.0, True, 3)
        assert c_f is not None and torch.allclose(c_f, c_s, rtol=1e-6, atol=0.0)
        assert torch.allclose(b_f, b_s, rtol=1e-6, atol=0.0) and torch.equal(b_f, ex_f)
        a = torch.rand(k, generator=torch.Generator().manual_seed(rows)) * 0.9 + 0.1
        b0 = torch.rand(rows, generator=torch.Generator().manual_seed(1)) / max(rows, 1)
        for omega, check in ((1.0, True), (1.6, False), (1.6, True)):
            out = []
            for threads in (0, 3):
                b, b_ex = b0.clone(), torch.zeros(rows)
                c = kernels._sweep(p_n, a, b, b_ex, 1 / 2000, omega, check, threads)
                out.append((b, b_ex, c.double()))
            (b_t, ex_t, c_t), (b_n, ex_n, c_n) = out
            assert torch.allclose(b_n, b_t, rtol=2e-6, atol=0.0)
            assert torch.allclose(ex_n, ex_t, rtol=2e-6, atol=0.0)
            e = (1 / 2000) / (p_n.double() @ a.double())  # float64 oracle of the exact rows
            assert torch.allclose(ex_n.double() if check else e, e, rtol=2e-6, atol=0.0)
            ref = torch.stack([b_n.double() @ p_n.double(), ex_n.double() @ p_n.double()])
            if not check:
                c_n, c_t, ref = c_n[:1], c_t[:1], ref[:1]
            assert torch.allclose(c_n, ref, rtol=1e-6, atol=1e-9 * ref.max().item())
            assert torch.allclose(c_t, ref, rtol=1e-4, atol=1e-7 * ref.max().item())
        if rows:  # the log-domain column step (n = 0 is only meaningful across ranks)
            z_max, la = z.amax(1), []
            for threads in (0, 3):
                buf = torch.empty(rows, k)
                la.append(
                    kernels._exact_log_alpha(z, z_max, 25.0, la0, m_n, b0, buf, None, threads)
                )
            assert torch.allclose(la[1], la[0], rtol=0.0, atol=2e-5)
        want = p_t.mul(a).argmax(1) if rows else torch.zeros(0, dtype=torch.int64)
        labels = sinkhorn_cpu.scaled_argmax(p_n.numpy(), a.numpy(), 3)
        assert torch.equal(torch.from_numpy(labels), want)


@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_recomputed_linear_logits_match_stored(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logits recomputed from features in row chunks (never stored whole) solve like the stored
    block: bit for bit in one chunk, and in several chunks (column sums then add up in another
    order) the same labels and iterations. Peaked logits at λ = 50 drive absorptions and the
    exact log-domain column step, both of which re-read the logits chunk by chunk."""
    monkeypatch.setenv("SELFCLUST_SINKHORN_CPU", kernel)
    exact_steps = []
    exact = kernels._exact_log_alpha

    def counted(*args: object, **kw: object) -> torch.Tensor:
        exact_steps.append(1)
        return exact(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(sk, "_exact_log_alpha", counted)  # the name the solver loop reads
    z = peaked_logits(3000, 24, 9)
    ref = sinkhorn_knopp(z, 50.0, group=None)
    assert ref.converged and exact_steps
    for chunk in (3000, 701):  # one chunk; five uneven ones
        lin = LinearLogits(z, torch.eye(24), chunk=chunk)
        assert torch.equal(torch.cat([blk for _, blk in lin.blocks()]), z)  # z I + 0 is exact
        got = sinkhorn_knopp(lin, 50.0, group=None)
        assert got.iterations == ref.iterations and got.rebuilds == ref.rebuilds and got.converged
        assert torch.equal(got.labels, ref.labels)
        tol = 0.0 if chunk == 3000 else 1e-4
        assert torch.allclose(got.log_alpha, ref.log_alpha, rtol=0.0, atol=tol)
        assert torch.allclose(got.log_beta, ref.log_beta, rtol=0.0, atol=tol)
    features = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    features[[3, 400], 1] = float("nan")
    with pytest.raises(ValueError, match="2 row"):
        sinkhorn_knopp(LinearLogits(features, torch.randn(5, 8), chunk=128), 25.0, group=None)
    with pytest.raises(ValueError, match="must agree"):
        LinearLogits(features, torch.randn(5, 7))


def test_fused_exp_within_two_ulp() -> None:
    x = -torch.rand(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.cat([87.0 * x, torch.tensor([0.0, -1e-30, -0.34657, -0.34658, -50.0, -86.9])])
    x = x.float()
    ref = x.double().exp()
    got = torch.from_numpy(sinkhorn_cpu.exp_neg(x.numpy())).double()
    ulp = torch.from_numpy(np.spacing(ref.float().numpy())).double()
    assert ((got - ref).abs() / ulp).max() <= 2.0


def test_fused_kernels_flush_denormals_and_restore_the_fp_mode() -> None:
    from selfclust.labels import sinkhorn_numba as sinkhorn_cpu

    tiny = np.float32(1e-20)  # 1e-40 is a float32 denormal
    product, before, inside, after = sinkhorn_cpu.flushed_product(tiny, tiny)
    if sinkhorn_cpu._X86:
        assert product == 0.0 and inside & 0x8040 == 0x8040  # FTZ and DAZ on inside
        assert after == before  # restored: torch, numpy, UMAP see the mode they set
    else:
        assert product > 0.0 and before == inside == after == 0
    assert np.float32(tiny) * tiny > 0.0  # this thread still computes denormals


def test_keep_torch_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with keep_torch_threads():
        torch.set_num_threads(before + 1)  # what numba's OpenMP start can do
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), keep_torch_threads():
        torch.set_num_threads(before + 2)
        raise RuntimeError("the body failed")
    assert torch.get_num_threads() == before


def test_cpu_kernel_switch_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    z = net_logits(3000, 24, seed=11)
    fused = sinkhorn_knopp(z.clone().requires_grad_(), 25.0, group=None)  # a head's output, say
    assert torch.get_num_threads() == 1  # numba's first launch must not change torch's count
    monkeypatch.setenv("SELFCLUST_SINKHORN_CPU", "torch")
    blas = sinkhorn_knopp(z, 25.0, group=None)
    assert fused.converged and blas.converged
    assert abs(fused.iterations - blas.iterations) <= 2
    assert (fused.labels == blas.labels).double().mean() >= 0.999
    monkeypatch.setenv("SELFCLUST_SINKHORN_CPU", "mkl")
    with pytest.raises(ValueError, match="SELFCLUST_SINKHORN_CPU must be 'numba' or 'torch'"):
        sinkhorn_knopp(z, 25.0, group=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    z = peaked_logits(20000, 100, seed=7)
    cpu = sinkhorn_knopp(z, 25.0, group=None)
    gpu = sinkhorn_knopp(z.cuda(), 25.0, group=None)
    assert gpu.labels.is_cuda and gpu.converged
    assert (gpu.labels.cpu() == cpu.labels).double().mean() >= 0.999
    assert torch.allclose(gpu.log_alpha.cpu(), cpu.log_alpha, atol=1e-2)
    # logits recomputed from features on the GPU (z I + 0 = z), in 3 chunks
    rec = sinkhorn_knopp(
        LinearLogits(z.cuda(), torch.eye(100, device="cuda"), chunk=7000), 25.0, group=None
    )
    assert rec.labels.is_cuda and rec.converged
    assert (rec.labels == gpu.labels).double().mean() >= 0.999


# ---------------------------------------------------------------- distributed


def _solve_rank(rank: int, world: int, tmp: str, bounds: list[int]) -> dict[str, object]:
    """One gloo rank: solve on its own rows of each case and return what it got."""
    cases = torch.load(f"{tmp}/cases.pt")
    lo, hi = bounds[rank], bounds[rank + 1]
    out: dict[str, object] = {}
    for name, (z, lam) in cases.items():
        res = sinkhorn_knopp(z[lo:hi], lam, group=WORLD)
        out[name] = vars(res)
    # NaN on the last rank only: every rank must raise (and none may hang).
    z_bad = cases["net"][0][lo:hi].clone()
    if rank == world - 1:
        z_bad[-1, 0] = float("nan")
    try:
        sinkhorn_knopp(z_bad, 25.0, group=WORLD)
        out["nan"] = "no error"
    except ValueError as err:
        out["nan"] = str(err)
    return out


@pytest.mark.parametrize(
    "bounds",
    [[0, 700, 3000], [0, 1400, 1400, 3000]],  # uneven; the 3-rank split has an empty rank
    ids=["2ranks", "3ranks-one-empty"],
)
def test_distributed_equals_single_process(tmp_path: Path, bounds: list[int]) -> None:
    world = len(bounds) - 1
    cases = {
        "net": (net_logits(3000, 24, seed=8), 25.0),
        "peaked": (peaked_logits(3000, 24, 9), 50.0),
    }
    torch.save(cases, tmp_path / "cases.pt")
    # a failing rank must fail the test, not hang it: ranks still running at 120 s are killed
    outs = run_ranks(_solve_rank, world, tmp_path, str(tmp_path), bounds, timeout_s=120)
    for name, (z, lam) in cases.items():
        ref = sinkhorn_knopp(z, lam, group=None)
        got = [o[name] for o in outs]
        assert all(g["iterations"] == ref.iterations for g in got)
        assert all(g["rebuilds"] == ref.rebuilds for g in got)
        assert all(g["converged"] == ref.converged for g in got)
        assert torch.equal(torch.cat([g["labels"] for g in got]), ref.labels)
        for g in got:
            assert torch.allclose(g["log_alpha"], ref.log_alpha, atol=1e-4)
            assert g["error"] == pytest.approx(ref.error, rel=1e-3)
        log_beta = torch.cat([g["log_beta"] for g in got])
        assert torch.allclose(log_beta, ref.log_beta, atol=1e-4)
    for o in outs:
        assert "1 row(s) with NaN or inf (of 3000)" in o["nan"]
