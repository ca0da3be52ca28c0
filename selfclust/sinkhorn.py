"""Distributed Sinkhorn-Knopp for SeLa's equal-size self-labelling (Asano et al., ICLR 2020).

Each rank holds its own rows of the logits; they are never gathered. The plan is

    Q = diag(β) · exp(λ z) · diag(α),   rows sum to 1/N, columns sum to 1/K,

and per iteration a rank streams its n × K block once (CPU: chunk by chunk, rows then columns
while the chunk is in cache; GPU: two matrix-vector products) and all-reduces K numbers.

Numerics: the kernel is one float32 block ``P = exp(λ (z − z_max) + log α₀ − M)``: each row is
shifted by its max (exact, absorbed in β) and a reference column scaling α₀ is absorbed too, so
the scalings a, b the iterations see stay near 1. When they drift too far apart, or a column
underflows (a cluster no sample prefers, at λ = 25), one exact log-domain column update is done
and absorbed into a rebuilt P (the "absorption" stabilisation of Schmitzer, 2019). log α₀ and the
shifts are float64/float32 vectors: nothing becomes inf or NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from selfclust.collectives import all_reduce_max, all_reduce_sum

# Kernel entries below e^-50 of their row's max are set to exactly 0: float32 denormals (below
# e^-87.3) make CPU arithmetic crawl. While the column scalings a stay within e^_ABSORB of each
# other, a dropped entry carries < e^-20 of its row's mass.
_LOG_P_MIN = -50.0
# Absorb the column scalings into P (with an exact log-domain step) once the log-spread of a
# exceeds this, so that float32 P @ a neither under- nor overflows.
_ABSORB = 30.0
# Floor for log a (relative to its max) between checks: keeps P_ik * a_k above float32's tiny.
_LOG_A_FLOOR = -36.0
# CPU: rows and columns are updated chunk by chunk, so the block streams from memory once per
# iteration (the chunk is still in cache for the column product): 1.5-3x faster than two passes.
_CHUNK_BYTES = 4 << 20
# Column sums below this (float64) count as underflowed.
_C_FLOOR = 1e-300


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


def _exponent(
    logits: torch.Tensor, z_max: torch.Tensor, lam: float, log_alpha0: torch.Tensor, out: Any
) -> torch.Tensor:
    """``out = λ (z − z_max) + log α₀`` in float32 ([n, K]); ``out=None`` allocates it.

    Subtracting the row max first keeps float32 rounding relative to the exponents that matter.
    """
    if out is None:
        out = logits.to(torch.float32, copy=True)  # the only n × K block we own
    else:
        out.copy_(logits)
    return out.sub_(z_max[:, None]).mul_(lam).add_(log_alpha0.to(torch.float32)[None, :])


def _build_kernel(
    logits: torch.Tensor, z_max: torch.Tensor, lam: float, log_alpha0: torch.Tensor, out: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """P = exp(s − M) with s = λ (z − z_max) + log α₀ and M_i = max_k s_ik; returns (P, M)."""
    p = _exponent(logits, z_max, lam, log_alpha0, out)  # [n, K] f32
    m = p.amax(dim=1) if p.shape[0] > 0 else p.new_zeros(0)  # [n]
    p.sub_(m[:, None]).clamp_(min=_LOG_P_MIN - 10.0).exp_()  # row max is exactly 1
    # Exact zeros below e^_LOG_P_MIN: no denormals in the products P_ik a_k and b_i P_ik.
    torch.nn.functional.threshold(p, math.exp(_LOG_P_MIN), 0.0, inplace=True)
    return p, m


def _row_col_update(
    p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inv_n: float
) -> torch.Tensor:
    """Row update ``b = (1/N) / (P @ a)`` in place, then return the local ``c = b @ P`` ([K])."""
    n, k = p.shape
    rows = max(64, _CHUNK_BYTES // (4 * k))  # bounded Python overhead for huge K
    if p.device.type != "cpu" or n <= rows:
        torch.mv(p, a, out=b).reciprocal_().mul_(inv_n)  # [n]
        return torch.mv(p.t(), b)  # [K]
    c = torch.zeros(k, dtype=torch.float32)
    for start in range(0, n, rows):
        blk, b_blk = p[start : start + rows], b[start : start + rows]  # [rows, K], [rows]
        torch.mv(blk, a, out=b_blk).reciprocal_().mul_(inv_n)
        c.addmv_(blk.t(), b_blk)  # blk is still in cache
    return c


def _exact_log_alpha(
    logits: torch.Tensor,
    z_max: torch.Tensor,
    lam: float,
    log_alpha0: torch.Tensor,
    m: torch.Tensor,
    b: torch.Tensor,
    buf: torch.Tensor,
    group: Any,
) -> torch.Tensor:
    """Column update in the log domain, immune to underflow; ``buf`` ([n, K]) is scratch.

    Returns the new log α₀ = log α₀ − logsumexp_i (log b_i + log P_ik) over all ranks, with P
    untruncated (one all_reduce_max and one all_reduce_sum of K numbers), shifted so that its
    max is 0 (any constant is absorbed by the next row update) and rounded to the float32
    values the rebuilt kernel will see.
    """
    k = buf.shape[1]
    _exponent(logits, z_max, lam, log_alpha0, buf).sub_(m[:, None]).add_(b.log()[:, None])
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
    logits: torch.Tensor,
    lam: float,
    tol: float = 1e-3,
    max_iters: int = 1000,
    group: Any = None,
    check_every: int = 1,
) -> SinkhornResult:
    """Equal-size pseudo-labels by entropy-regularised optimal transport (SeLa).

    Args:
        logits: [n, K] this rank's rows (any float dtype, CPU or CUDA); not modified.
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

    # One all-reduce gives N and the number of non-finite rows, so all ranks raise together.
    if n > 0:
        z_min, z_max = torch.aminmax(logits, dim=1)  # [n] each; NaN and ±inf propagate
        bad = (~(torch.isfinite(z_min) & torch.isfinite(z_max))).sum()
        z_max = z_max.to(torch.float32)
        del z_min
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
    p, m = _build_kernel(logits, z_max, lam, log_alpha0, None)  # [n, K] f32, [n] f32
    a = torch.ones(k, dtype=torch.float32, device=device)  # column scaling relative to P
    b = torch.empty(n, dtype=torch.float32, device=device)
    error, converged, fresh = math.inf, False, True
    it = 0
    for it in range(1, max_iters + 1):
        # Rows (local): b_i = (1/N) / Σ_k P_ik a_k; P's row max is 1 and a ≥ e^-36: b finite.
        # Columns: c_k = Σ_i b_i P_ik over all ranks — the one all_reduce of K numbers.
        c = all_reduce_sum(_row_col_update(p, a, b, inv_n).to(torch.float64), group)  # [K]
        log_a = -math.log(k) - c.clamp(min=_C_FLOOR).log()  # next column update, [K] f64
        if fresh or it % check_every == 0 or it == max_iters:
            err_t = (c * a.to(torch.float64) * k - 1.0).abs().max()
            spread_t = log_a.max() - log_a.min()
            error, spread = torch.stack([err_t, spread_t]).tolist()  # host-device sync
            fresh = False
            if error < tol:
                converged = True
                break
            if it == max_iters:
                break
            if not spread <= _ABSORB:
                # Scalings drifted (or a column underflowed): exact step, absorb it into P.
                log_alpha0 = _exact_log_alpha(logits, z_max, lam, log_alpha0, m, b, p, group)
                p, m = _build_kernel(logits, z_max, lam, log_alpha0, p)
                a.fill_(1.0)
                fresh = True
                continue
        log_a -= log_a.max()
        a = log_a.clamp_(min=_LOG_A_FLOOR).exp_().to(torch.float32)

    # Q_ik = b_i P_ik a_k = exp(log b_i − M_i − λ z_max_i + λ z_ik + log α₀_k + log a_k).
    log_alpha = log_alpha0 + a.to(torch.float64).log()
    log_beta = b.to(torch.float64).log() - m.to(torch.float64) - lam * z_max.to(torch.float64)
    labels = p.mul_(a[None, :]).argmax(dim=1) if n > 0 else torch.zeros(0, dtype=torch.int64)
    del p
    return SinkhornResult(
        labels=labels.to(device),
        log_alpha=log_alpha,
        log_beta=log_beta,
        iterations=it,
        error=float(error),
        converged=converged,
    )
