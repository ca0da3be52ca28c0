"""Distributed Sinkhorn-Knopp for SeLa's equal-size self-labelling (Asano et al., ICLR 2020).

Each rank holds its own rows of the logits; they are never gathered. The plan is

    Q = diag(β) · exp(λ z) · diag(α),   rows sum to 1/N, columns sum to 1/K,

and per iteration a rank streams its n × K block once and all-reduces K numbers. CPU: a fused
numba kernel (:mod:`~selfclust.labels.sinkhorn_numba`: each row's dot with α, its β update
and its share of the column sums while the row is in L1), or with
``SELFCLUST_SINKHORN_CPU=torch`` BLAS on cache-sized chunks (rows then columns while the chunk
is in cache); GPU: two matrix-vector products.

Numerics: the kernel is one float32 block ``P = exp(λ (z − z_max) + log α₀ − M)``: each row is
shifted by its max (exact, absorbed in β) and a reference column scaling α₀ is absorbed too, so
the scalings a, b the iterations see stay near 1. When they drift too far apart, or a column
underflows (a cluster no sample prefers, at λ = 25), one exact log-domain column update is done
and absorbed into a rebuilt P (the "absorption" stabilisation of Schmitzer, 2019), built a little
ahead along the direction the scalings are moving. log α₀ and the shifts are float64/float32
vectors: nothing becomes inf or NaN.

Convergence: plain Sinkhorn contracts at a rate ρ that tends to 1 as the logits grow
confident or λ grows (on a trained MNIST head at λ = 25 it needs ~5,500 iterations for 1e-3).
Both half-steps are therefore over-relaxed in the log domain, ``log b ← (1−ω) log b + ω log
b_exact`` and likewise for a: for the two-block (2-cyclic) iteration, SOR theory gives the
optimal ω* = 2 / (1 + √(1−ρ)) and the rate ω* − 1 ≈ 1 − 2√(1−ρ). ρ is estimated from the error
decay between checks (ω = 1 at first, then inverting the SOR eigenvalue relation
(μ + ω − 1)² = μ ω² ρ), so no tuning is needed; 30-40× fewer iterations at λ = 25-50.
The error is always measured on the plan with *exact* rows, so the contract is unchanged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from selfclust.collectives import all_reduce_max, all_reduce_sum
from selfclust.threads import keep_torch_threads

# Kernel entries below e^-87 of their row's max (float32's smallest normal is e^-87.3) are set
# to exactly 0. While the column scalings a stay within e^_ABSORB of each other, a dropped entry
# carries < e^-20 of its row's mass (the row's max entry keeps ≥ e^-_ABSORB of it). Products
# P_ik a_k can then underflow, which is harmless (they are < e^-20 of the row too); the fused
# CPU kernels flush them to zero (FTZ/DAZ, :mod:`~selfclust.labels.sinkhorn_numba`), as GPUs
# do at speed.
_LOG_P_MIN = -87.0
# Absorb the column scalings into P (with an exact log-domain step) once the log-spread of a
# exceeds this (_LOG_P_MIN + _ABSORB = -20: the dropped entries' bound above).
_ABSORB = 67.0
# Floor for log a (relative to its max) between checks: keeps each row's mass ≥ e^-73, so the
# row scalings b stay finite in float32 even if a check comes late (check_every > 1).
_LOG_A_FLOOR = -73.0
# At an absorption, the kernel is built for where the scalings are heading: each column's log a
# moves on mostly in the direction it moved since the last build, so P absorbs that direction,
# scaled to a spread of _AHEAD · _ABSORB, and a starts at the opposite offset (the plan is
# unchanged). Its spread then falls and grows back through 0, nearly twice as many iterations
# before the next rebuild (a cold λ = 25 solve: 8 rebuilds instead of 12).
_AHEAD = 0.9
# CPU: rows and columns are updated chunk by chunk, so the block streams from memory once per
# iteration (the chunk is still in cache for the column product): 1.5-3x faster than two passes.
_CHUNK_BYTES = 4 << 20
# Column sums below this (float64) count as underflowed.
_C_FLOOR = 1e-300
# A column whose float32 sum is below this lost its digits to underflow: absorbing its step
# needs the exact log-domain update.
_C_UNDERFLOW = 1e-30
# Over-relaxation: ω stays 1 for the first _OMEGA_WARMUP iterations (the transient is not
# linear), is re-estimated over windows of at least _OMEGA_WINDOW iterations, never exceeds
# _OMEGA_MAX (rate ω − 1 if ρ is over-estimated) and is halved towards 1 if the error grows.
_OMEGA_WARMUP = 20
_OMEGA_WINDOW = 10
_OMEGA_MAX = 1.98
# LinearLogits: default rows per recomputed chunk, as bytes of float32 logits.
_RECOMPUTE_BYTES = 64 << 20
# CPU kernels: "numba" (fused, default) or "torch" (BLAS on chunks; for comparison/fallback).
_CPU_KERNEL_ENV = "SELFCLUST_SINKHORN_CPU"


def _numba_threads(t: torch.Tensor | LinearLogits) -> int:
    """Threads for the fused numba kernels on ``t``'s device, or 0 for the torch path: on
    non-CPU devices, with ``SELFCLUST_SINKHORN_CPU=torch``, or in a forked DataLoader worker
    (numba's OpenMP layer is not fork-safe). Uses as many threads as torch."""
    if t.device.type != "cpu":
        return 0
    choice = os.environ.get(_CPU_KERNEL_ENV, "numba")
    if choice not in ("numba", "torch"):
        raise ValueError(f"{_CPU_KERNEL_ENV} must be 'numba' or 'torch', got {choice!r}")
    if choice == "torch" or torch.utils.data.get_worker_info() is not None:
        return 0
    from selfclust.labels import (
        sinkhorn_numba as sinkhorn_cpu,  # numba: imported (and JIT-loaded) on first CPU use
    )

    with keep_torch_threads():
        return sinkhorn_cpu.set_threads(torch.get_num_threads())


@dataclass
class SinkhornResult:
    """Solution of the balanced self-labelling problem for this rank's rows.

    ``log Q_ik = log_beta[i] + lam * logits[i, k] + log_alpha[k]`` reconstructs the plan.
    """

    labels: torch.Tensor  # [n] int64, argmax_k (lam * z_ik + log_alpha_k), on logits' device
    log_alpha: torch.Tensor  # [K] float64, same on every rank
    log_beta: torch.Tensor  # [n] float64, this rank's rows (includes the row-max shift)
    iterations: int  # row+column updates done (all ranks agree)
    error: float  # max_k |K * Σ_i Q_ik − 1| after the last row update
    converged: bool  # error < tol


class LinearLogits:
    """A linear head's logits ``features @ weight.T + bias``, never held whole: Sinkhorn
    recomputes them in row chunks (one ``addmm`` each) whenever it reads the logits (the
    checks, each kernel rebuild and exact column step), so its peak memory is the features
    plus one ``[n, K]`` float32 block (the kernel) and one chunk (``chunk`` rows, by default
    ~64 MiB of logits) instead of two blocks. Worth it where a matrix product is cheap next to
    the memory, i.e. on GPUs; on a CPU each rebuild then costs a product of ``n × D × K``.
    The result equals solving on the stored logits up to the order of float32 column sums.
    """

    def __init__(
        self,
        features: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        chunk: int | None = None,
    ) -> None:
        if features.dim() != 2 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
            raise ValueError(
                f"features [n, D] and weight [K, D] must agree, got {tuple(features.shape)} "
                f"and {tuple(weight.shape)}"
            )
        k = weight.shape[0]
        self.features = features
        self.weight = weight.detach().float()
        self.bias = (torch.zeros(k) if bias is None else bias.detach()).float().to(weight.device)
        self.chunk = max(1, chunk or _RECOMPUTE_BYTES // (4 * k))
        self.shape = torch.Size((features.shape[0], k))
        self.device = features.device
        self.dtype = torch.float32  # of the recomputed blocks

    def dim(self) -> int:
        return 2

    def is_floating_point(self) -> bool:
        return True

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, logits of those rows) for consecutive row chunks, float32, contiguous."""
        w_t = self.weight.t()
        for start in range(0, self.shape[0], self.chunk):
            f = self.features[start : start + self.chunk]
            yield slice(start, start + f.shape[0]), torch.addmm(self.bias, f.float(), w_t)


def _blocks(logits: torch.Tensor | LinearLogits) -> Iterator[tuple[slice, torch.Tensor]]:
    """The logits as (rows, block) pairs: a stored tensor is one block."""
    if isinstance(logits, LinearLogits):
        yield from logits.blocks()
    else:
        yield slice(0, logits.shape[0]), logits


def _build_blocks(
    logits: torch.Tensor | LinearLogits,
    z_max: torch.Tensor,
    lam: float,
    log_alpha0: torch.Tensor,
    out: Any,
    threads: int,
    rows: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`_build_kernel` block by block (:func:`_blocks`) into one kernel ``out``
    (allocated if None); the first sweep's column sums add up over the blocks."""
    n, k = logits.shape
    p = torch.empty(n, k, dtype=torch.float32, device=logits.device) if out is None else out
    m = torch.empty(n, dtype=torch.float32, device=logits.device)
    b, b_ex, inv_n, a = rows
    sums = []
    for sl, z in _blocks(logits):
        _, m[sl], c = _build_kernel(
            z, z_max[sl], lam, log_alpha0, p[sl], threads, (b[sl], b_ex[sl], inv_n, a)
        )
        sums.append(c)
    done = [c for c in sums if c is not None]  # torch kernels do no first sweep
    return p, m, (torch.stack(done).sum(0) if done and len(done) == len(sums) else None)


def _exponent(
    logits: torch.Tensor, z_max: torch.Tensor, lam: float, log_alpha0: torch.Tensor, out: Any
) -> torch.Tensor:
    """``out = λ (z − z_max) + log α₀`` in float32 ([n, K]); ``out=None`` allocates it.

    Subtracting the row max first keeps float32 rounding relative to the exponents that matter.
    """
    if out is None:
        out = logits.to(torch.float32, copy=True)  # the only n × K block we own
        out.sub_(z_max[:, None])
    elif logits.dtype == torch.float32:
        torch.sub(logits, z_max[:, None], out=out)  # one pass instead of copy + sub
    else:
        out.copy_(logits).sub_(z_max[:, None])
    # out = log α₀ + λ · out, one pass
    return torch.add(log_alpha0.to(torch.float32)[None, :], out, alpha=lam, out=out)


def _build_kernel(
    logits: torch.Tensor,
    z_max: torch.Tensor,
    lam: float,
    log_alpha0: torch.Tensor,
    out: Any,
    threads: int = 0,
    rows: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """P = exp(s − M) with s = λ (z − z_max) + log α₀ and M_i = max_k s_ik; returns (P, M, c).

    ``threads > 0``: one fused numba pass (float32/float64 contiguous logits), which with
    ``rows = (b, b_ex, 1/N)`` also does the first sweep on P (a = 1, ω = 1, check) and returns
    its column sums c; otherwise torch, and c is None.
    """
    if threads and logits.dtype in (torch.float32, torch.float64) and logits.is_contiguous():
        from selfclust.labels import sinkhorn_numba as sinkhorn_cpu

        n, k = logits.shape
        p = torch.empty(n, k, dtype=torch.float32) if out is None else out
        m = torch.empty(n, dtype=torch.float32)
        if rows is None:
            rows = (torch.empty(n), torch.empty(n), 1.0, torch.ones(k))
        b, b_ex, inv_n, a = rows
        la0 = log_alpha0.to(torch.float32).numpy()
        z, zm = logits.detach().numpy(), z_max.detach().numpy()
        args = (z, zm, lam, la0, _LOG_P_MIN, p.numpy(), m.numpy(), inv_n, a.numpy())
        c = sinkhorn_cpu.build_kernel(*args, b.numpy(), b_ex.numpy(), threads)
        return p, m, (torch.from_numpy(c) if rows is not None else None)
    p = _exponent(logits, z_max, lam, log_alpha0, out)  # [n, K] f32
    m = p.amax(dim=1) if p.shape[0] > 0 else p.new_zeros(0)  # [n]
    p.sub_(m[:, None]).clamp_(min=_LOG_P_MIN).exp_()  # row max is exactly 1; no denormals
    # Exact zeros at and below e^_LOG_P_MIN.
    torch.nn.functional.threshold(p, math.exp(_LOG_P_MIN), 0.0, inplace=True)
    return p, m, None


def _sweep(
    p: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    b_ex: torch.Tensor,
    inv_n: float,
    omega: float,
    check: bool,
    threads: int = 0,
) -> torch.Tensor:
    """One pass over P: rows ``b ← b_ex (b_ex / b)^(ω−1)`` with ``b_ex = (1/N) / (P @ a)``
    (in place), then the local column sums ``[2, K]``: ``b @ P`` and, on check iterations,
    ``b_ex @ P`` (the column marginals of the plan with exact rows, for the error; ``b_ex``
    is written then too).

    ``threads > 0``: the fused numba kernel (float64 sums). Otherwise CPU: row chunks of
    ~_CHUNK_BYTES, the column product reads the chunk while it is in cache, so the block streams
    from memory once per iteration; other devices: two matrix products.
    """
    if threads:
        from selfclust.labels import sinkhorn_numba as sinkhorn_cpu

        args = (p.numpy(), a.numpy(), b.numpy(), b_ex.numpy(), inv_n, omega, check, threads)
        return torch.from_numpy(sinkhorn_cpu.sweep(*args))
    n, k = p.shape
    rows = max(n, 1) if p.device.type != "cpu" else max(64, _CHUNK_BYTES // (4 * k))
    c = torch.zeros(2, k, dtype=torch.float32, device=p.device)
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        blk, b_blk = p[sl], b[sl]  # [rows, K], [rows]
        e = torch.mv(blk, a).reciprocal_().mul_(inv_n)  # exact rows, [rows]
        if omega != 1.0:  # log-domain relaxation, as a ratio near 1 (no float32 overflow)
            b_blk.copy_(e * (e / b_blk).pow_(omega - 1.0))
        else:
            b_blk.copy_(e)
        c[0].addmv_(blk.t(), b_blk)  # blk is still in cache (CPU)
        if check:
            b_ex[sl] = e
            if omega != 1.0:  # (a [rows, 2] matmul is 10-60x slower than two addmv on CPU)
                c[1].addmv_(blk.t(), e)
    if check and omega == 1.0:
        c[1] = c[0]
    return c


def _next_omega(omega: float, rate: float) -> float:
    """Over-relaxation factor for the next window, from the error decay ``rate`` per iteration.

    For the two-block iteration the SOR eigenvalues μ satisfy (μ + ω − 1)² = μ ω² ρ, where ρ is
    plain Sinkhorn's rate; solving for ρ from the observed μ = rate gives ω* = 2 / (1 + √(1−ρ)).
    """
    if not rate < 1.0:  # the error grew over the window: back off towards plain Sinkhorn
        return 1.0 + (omega - 1.0) / 2
    if rate <= omega - 1.0:  # complex eigenvalues: ω is already at or above ω*
        return omega
    rho = min((rate + omega - 1.0) ** 2 / (rate * omega * omega), 1.0 - 1e-12)
    return max(omega, min(_OMEGA_MAX, 2.0 / (1.0 + math.sqrt(1.0 - rho))))


def _exact_log_alpha(
    logits: torch.Tensor | LinearLogits,
    z_max: torch.Tensor,
    lam: float,
    log_alpha0: torch.Tensor,
    m: torch.Tensor,
    b: torch.Tensor,
    buf: torch.Tensor,
    group: Any,
    threads: int = 0,
) -> torch.Tensor:
    """Column update in the log domain, immune to underflow; ``buf`` ([n, K]) is scratch.

    Returns the new log α₀ = log α₀ − logsumexp_i (log b_i + log P_ik) over all ranks, with P
    untruncated (one all_reduce_max and one all_reduce_sum of K numbers), shifted so that its
    max is 0 (any constant is absorbed by the next row update) and rounded to the float32
    values the rebuilt kernel will see. ``threads > 0``: two fused numba passes that read the
    logits and leave ``buf`` alone; else torch, through ``buf``.
    """
    k = buf.shape[1]
    fused = isinstance(logits, LinearLogits) or (
        logits.dtype in (torch.float32, torch.float64) and logits.is_contiguous()
    )
    if threads and fused:
        from selfclust.labels import sinkhorn_numba as sinkhorn_cpu

        la0 = log_alpha0.to(torch.float32).numpy()
        log_b = b.log()

        def arrays(sl: slice, z: torch.Tensor) -> tuple[Any, Any, Any, Any]:
            zm, mm, lb = z_max[sl].detach().numpy(), m[sl].numpy(), log_b[sl].numpy()
            return z.detach().contiguous().numpy(), zm, mm, lb

        col_max = torch.full((k,), -math.inf, dtype=torch.float64)
        for sl, z in _blocks(logits):  # (a LinearLogits recomputes its blocks in each pass)
            zz, zm, mm, lb = arrays(sl, z)
            part = sinkhorn_cpu.log_col_max(zz, zm, lam, la0, mm, lb, threads)
            col_max = torch.maximum(col_max, torch.from_numpy(part))
        col_max = all_reduce_max(col_max, group)
        cm32 = col_max.to(torch.float32).numpy()
        col_sum = torch.zeros(k, dtype=torch.float64)
        for sl, z in _blocks(logits):
            zz, zm, mm, lb = arrays(sl, z)
            col_sum += torch.from_numpy(
                sinkhorn_cpu.log_col_sum(zz, zm, lam, la0, mm, lb, cm32, threads)
            )
        col_sum = all_reduce_sum(col_sum, group)
        log_alpha = log_alpha0 - col_max - col_sum.log()
        return (log_alpha - log_alpha.max()).to(torch.float32).to(torch.float64)
    for sl, z in _blocks(logits):
        _exponent(z, z_max[sl], lam, log_alpha0, buf[sl])
    buf.sub_(m[:, None]).add_(b.log()[:, None])
    if buf.shape[0] > 0:
        col_max = buf.amax(dim=0).to(torch.float64)  # [K]
    else:
        col_max = torch.full((k,), -math.inf, dtype=torch.float64, device=buf.device)
    all_reduce_max(col_max, group)
    # Clamp: float32 denormals are slow; entries below e^-87 of their column's max don't count.
    buf.sub_(col_max.to(torch.float32)[None, :]).clamp_(min=-87.0).exp_()
    col_sum = all_reduce_sum(buf.sum(dim=0, dtype=torch.float64), group)  # [K]
    log_alpha = log_alpha0 - col_max - col_sum.log()  # −log K dropped: rows absorb constants
    return (log_alpha - log_alpha.max()).to(torch.float32).to(torch.float64)


def sinkhorn_knopp(
    logits: torch.Tensor | LinearLogits,
    lam: float,
    tol: float = 1e-3,
    max_iters: int = 1000,
    group: Any = None,
    check_every: int = 1,
) -> SinkhornResult:
    """Equal-size pseudo-labels by entropy-regularised optimal transport (SeLa).

    Args:
        logits: [n, K] this rank's rows (any float dtype, CPU or CUDA); not modified. Or a
            :class:`LinearLogits`, recomputed in row chunks when needed instead of stored.
        lam: λ > 0, inverse entropic regularisation (SeLa uses 25; up to 50 is supported).
        tol: stop when ``error < tol``. Float32 iterations stall near 1e-6, so keep tol ≥ 1e-5;
            1e-3 is plenty for labels.
        max_iters: at most this many iterations; ``converged`` is False if reached.
        group: None runs on this process alone; :data:`selfclust.collectives.WORLD` or a
            process group runs over all its ranks, each passing its own rows (may be 0 rows).
            Every rank must call with the same K, lam, tol, max_iters and check_every.
        check_every: test convergence every this many iterations. Each test is one host-device
            sync (free on CPU); no extra communication, the column sums are already all-reduced.

    Returns:
        :class:`SinkhornResult`. ``error`` is the max relative deviation of the column
        marginals from 1/K, measured after the row update, i.e. with rows summing exactly to
        1/N: ``error = max_k |K · Σ_i Q_ik − 1|`` over all N rows. The returned plan is that
        one (the final column update is not applied).

    Raises:
        ValueError: logits not 2-D, K < 2, lam ≤ 0, non-finite logits (on every rank, with the
            global count of bad rows), or fewer samples N than clusters K.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [n, K], got shape {tuple(logits.shape)}")
    n, k = logits.shape
    if k < 2:
        raise ValueError(f"need K >= 2 clusters, got K={k}")
    if not (lam > 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a finite number > 0, got {lam}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iters < 1 or check_every < 1:
        raise ValueError(f"max_iters and check_every must be >= 1, got {max_iters}, {check_every}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    device = logits.device
    threads = _numba_threads(logits)  # 0: torch kernels

    # One all-reduce gives N and the number of non-finite rows, so all ranks raise together.
    if n > 0:
        # [n] each; NaN and ±inf propagate (two passes: aminmax(dim=1) is ~10x slower on CPU)
        maxima, bad = [], torch.zeros((), dtype=torch.int64, device=device)
        for _, z in _blocks(logits):
            z_min, z_blk_max = z.amin(dim=1), z.amax(dim=1)
            bad = bad + (~(torch.isfinite(z_min) & torch.isfinite(z_blk_max))).sum()
            maxima.append(z_blk_max.to(torch.float32))
        z_max = torch.cat(maxima)
        del z, z_min, z_blk_max, maxima  # a recomputed block must not outlive its pass
    else:
        bad = torch.zeros((), dtype=torch.int64, device=device)
        z_max = torch.zeros(0, dtype=torch.float32, device=device)
    counts = torch.stack([torch.tensor(n, device=device), bad.to(torch.int64)])
    n_total, n_bad = all_reduce_sum(counts, group).tolist()  # host-device sync, once
    if n_bad:
        raise ValueError(
            f"logits have {n_bad} row(s) with NaN or inf (of {n_total}); the model has diverged "
            "or the inputs are corrupt: check the loss and learning rate, or restore a checkpoint"
        )
    if n_total < k:
        raise ValueError(f"K={k} clusters > N={n_total} samples: use fewer clusters or more data")

    inv_n = 1.0 / n_total
    log_alpha0 = torch.zeros(k, dtype=torch.float64, device=device)  # absorbed in P
    a = torch.ones(k, dtype=torch.float32, device=device)  # column scaling relative to P
    log_a = torch.zeros(k, dtype=torch.float64, device=device)  # log a as applied
    b = torch.empty(n, dtype=torch.float32, device=device)  # row scaling (relaxed)
    b_ex = torch.empty(n, dtype=torch.float32, device=device)  # exact rows, set on checks
    # [n, K] f32, [n] f32; numba: c_first holds the column sums of the first sweep on P
    rows = (b, b_ex, inv_n, a)
    p, m, c_first = _build_blocks(logits, z_max, lam, log_alpha0, None, threads, rows)
    built = log_alpha0  # the scalings at the last build (α₀ + log a), for the drift
    error, converged, fresh = math.inf, False, True
    omega, anchor = 1.0, (0, math.inf)  # over-relaxation and the (iteration, error) it saw
    it = 0
    for it in range(1, max_iters + 1):
        check = fresh or it % check_every == 0 or it == max_iters
        w = 1.0 if fresh else omega  # fresh: b is not a row scaling of this P yet
        # Rows (local): b_ex_i = (1/N) / Σ_k P_ik a_k; P's row max is 1 and a ≥ e^-73: finite.
        # Columns: c_k = Σ_i b_i P_ik over all ranks — the one all_reduce (K numbers; 2K on
        # checks, whose second row holds the exact-row column sums that the error needs).
        if c_first is not None:  # done by the build (fresh: the a it was given, w = 1, check)
            c, c_first = c_first, None
        else:
            c = _sweep(p, a, b, b_ex, inv_n, w, check, threads)  # [2, K] f32 or f64
        c = all_reduce_sum((c if check else c[:1]).to(torch.float64), group)
        target = -math.log(k) - c[0].clamp(min=_C_FLOOR).log()  # exact column step, [K] f64
        nxt = target if w == 1.0 else torch.lerp(log_a, target, w)  # (1−ω) log a + ω target
        if check:
            err_t = (c[1] * a.to(torch.float64) * k - 1.0).abs().max()
            spread_t = nxt.max() - nxt.min()
            error, spread, c_min = torch.stack([err_t, spread_t, c[0].min()]).tolist()  # sync
            was_fresh, fresh = fresh, False
            if error < tol:
                converged = True
                break
            if it == max_iters:
                break
            if not spread <= _ABSORB:
                # Scalings drifted: absorb the next column step into P. If a column underflowed
                # (a cluster no sample prefers) its step is unknown: take an exact one instead.
                ahead = torch.zeros_like(log_alpha0)
                if c_min < _C_UNDERFLOW:
                    log_alpha0 = _exact_log_alpha(
                        logits, z_max, lam, log_alpha0, m, b_ex, p, group, threads
                    )
                else:
                    eff = log_alpha0 + nxt  # the scalings the plan has now
                    drift = eff - built
                    moved = float(drift.max() - drift.min())  # > _ABSORB, unless just built
                    if moved > 1.0:
                        ahead = drift * (_AHEAD * _ABSORB / moved)
                    eff = eff + ahead
                    log_alpha0 = (eff - eff.max()).to(torch.float32).double()
                built = log_alpha0 - ahead
                log_a = ahead.min() - ahead  # the plan is unchanged: a undoes `ahead`, max 0
                a = log_a.exp().to(torch.float32)
                p, m, c_first = _build_blocks(
                    logits, z_max, lam, log_alpha0, p, threads, (b, b_ex, inv_n, a)
                )
                fresh = True
                continue
            if it >= _OMEGA_WARMUP and not was_fresh:
                if it - anchor[0] >= _OMEGA_WINDOW and math.isfinite(anchor[1]):
                    omega = _next_omega(omega, (error / anchor[1]) ** (1.0 / (it - anchor[0])))
                if it - anchor[0] >= _OMEGA_WINDOW or not math.isfinite(anchor[1]):
                    anchor = (it, error)
        # Gauge: keep max log a = 0 (a ≤ 1, no overflow in P @ a) and move the constant into b,
        # so that the relaxed row step compares b_ex with a b of the same gauge.
        shift = nxt.max()
        log_a = (nxt - shift).clamp_(min=_LOG_A_FLOOR)
        b.mul_(shift.exp().to(torch.float32))
        a = log_a.exp().to(torch.float32)

    # Q_ik = b_i P_ik a_k = exp(log b_i − M_i − λ z_max_i + λ z_ik + log α₀_k + log a_k),
    # with the exact rows of the last (check) iteration.
    log_alpha = log_alpha0 + a.to(torch.float64).log()
    log_beta = b_ex.to(torch.float64).log() - m.to(torch.float64) - lam * z_max.to(torch.float64)
    if threads:
        from selfclust.labels import sinkhorn_numba as sinkhorn_cpu

        labels = torch.from_numpy(sinkhorn_cpu.scaled_argmax(p.numpy(), a.numpy(), threads))
    elif n > 0:
        labels = p.mul_(a[None, :]).argmax(dim=1)
    else:
        labels = torch.zeros(0, dtype=torch.int64)
    del p
    return SinkhornResult(
        labels=labels.to(device),
        log_alpha=log_alpha,
        log_beta=log_beta,
        iterations=it,
        error=float(error),
        converged=converged,
    )
