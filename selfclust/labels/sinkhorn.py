"""Distributed Sinkhorn-Knopp for SeLa's equal-size self-labelling (Asano et al., ICLR 2020).

Each rank holds its own rows of the logits; they are never gathered. The plan is

    Q = diag(β) · exp(λ z) · diag(α),   rows sum to 1/N, columns sum to 1/K,

and per iteration a rank streams its n × K block once and all-reduces K numbers. CPU: a fused
numba kernel (:mod:`~selfclust.labels.sinkhorn_numba`: each row's dot with α, its β update
and its share of the column sums while the row is in L1), or with
``SELFCLUST_SINKHORN_CPU=torch`` BLAS on cache-sized chunks (rows then columns while the chunk
is in cache); GPU: two matrix-vector products.

This module is the contract and the loop. The rest of the solver:

* :mod:`~selfclust.labels.sinkhorn_kernels`: the float32 kernel P, its build, the sweep over
  it, the exact log-domain column step, and the choice of backend;
* :mod:`~selfclust.labels.sinkhorn_scalings`: the scalings a, b, α₀ and their absorption into
  P when they drift apart (numerics: why nothing becomes inf or NaN);
* :mod:`~selfclust.labels.sinkhorn_relaxation`: the over-relaxation ω (convergence: why 30-40×
  fewer iterations than plain Sinkhorn);
* :mod:`~selfclust.labels.sinkhorn_logits`: :class:`LinearLogits`, logits recomputed in chunks;
* :mod:`~selfclust.labels.sinkhorn_reference`: plain float64 log-domain Sinkhorn, the readable
  specification and the tests' oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from selfclust.collectives import Group, all_reduce_sum
from selfclust.labels.sinkhorn_kernels import (
    _build_blocks,
    _exact_log_alpha,
    _numba_threads,
    _scaled_argmax,
    _sweep,
)
from selfclust.labels.sinkhorn_logits import LinearLogits, _blocks, head_logits
from selfclust.labels.sinkhorn_relaxation import _Relaxation
from selfclust.labels.sinkhorn_scalings import _Scalings

__all__ = ["LinearLogits", "RelabelStats", "SinkhornResult", "sinkhorn_knopp", "sinkhorn_labels"]


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
    rebuilds: int  # kernel rebuilds (absorptions) after the first build (all ranks agree)


def _check_args(
    logits: torch.Tensor | LinearLogits, lam: float, tol: float, max_iters: int, check_every: int
) -> None:
    """The local argument checks of :func:`sinkhorn_knopp` (each rank raises alone)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [n, K], got shape {tuple(logits.shape)}")
    _, k = logits.shape
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


def _global_row_stats(
    logits: torch.Tensor | LinearLogits, group: Group
) -> tuple[torch.Tensor, int]:
    """(z_max [n] float32, this rank's row maxima; N, the rows over all ranks).

    One all-reduce gives N and the number of non-finite rows, so all ranks raise together.
    """
    n, k = logits.shape
    device = logits.device
    if n > 0:
        # [n] each; NaN and ±inf propagate (two passes: aminmax(dim=1) is ~10x slower on CPU)
        maxima, bad = [], torch.zeros((), dtype=torch.int64, device=device)
        for _, z in _blocks(logits):  # a recomputed block is freed on return, before P exists
            z_min, z_blk_max = z.amin(dim=1), z.amax(dim=1)
            bad = bad + (~(torch.isfinite(z_min) & torch.isfinite(z_blk_max))).sum()
            maxima.append(z_blk_max.to(torch.float32))
        z_max = torch.cat(maxima)
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
    return z_max, n_total


class _Kernel:
    """The kernel P [n, K] float32 of this rank's rows (:mod:`~selfclust.labels.sinkhorn_kernels`)
    with its row shifts M [n] float32, and what it is built from: built on creation with the
    scalings ``sc`` (numba: with the first sweep, whose column sums wait in ``c_first``)."""

    def __init__(
        self,
        logits: torch.Tensor | LinearLogits,
        z_max: torch.Tensor,
        lam: float,
        group: Group,
        threads: int,
        n_total: int,
        sc: _Scalings,
    ) -> None:
        self.logits, self.z_max, self.lam, self.group = logits, z_max, lam, group
        self.threads = threads  # 0: torch kernels
        self.inv_n = 1.0 / n_total
        self.p, self.m, self.c_first = _build_blocks(
            logits, z_max, lam, sc.log_alpha0, None, threads, sc.rows(self.inv_n)
        )

    def rebuild(self, sc: _Scalings) -> None:
        """P for the new ``sc.log_alpha0``, in place (numba: with the first sweep on it)."""
        rows = sc.rows(self.inv_n)
        args = (self.logits, self.z_max, self.lam, sc.log_alpha0, self.p, self.threads, rows)
        self.p, self.m, self.c_first = _build_blocks(*args)

    def column_sums(self, sc: _Scalings, w: float, check: bool) -> torch.Tensor:
        """One sweep with relaxation ``w`` (updates ``sc.b``; ``sc.b_ex`` on checks), then its
        column sums over all ranks, [1, K] f64, or [2, K] on checks."""
        # Rows (local): b_ex_i = (1/N) / Σ_k P_ik a_k; P's row max is 1 and a ≥ e^-73: finite.
        # Columns: c_k = Σ_i b_i P_ik over all ranks — the one all_reduce (K numbers; 2K on
        # checks, whose second row holds the exact-row column sums that the error needs).
        if self.c_first is not None:  # done by the build (fresh: the a it was given, w = 1, check)
            c, self.c_first = self.c_first, None
        else:
            c = _sweep(self.p, sc.a, sc.b, sc.b_ex, self.inv_n, w, check, self.threads)  # [2, K]
        return all_reduce_sum((c if check else c[:1]).to(torch.float64), self.group)

    def exact_log_alpha(self, sc: _Scalings) -> torch.Tensor:
        """The exact log-domain column step from ``sc`` (P is its scratch: rebuild it after)."""
        args = (self.logits, self.z_max, self.lam, sc.log_alpha0, self.m, sc.b_ex, self.p)
        return _exact_log_alpha(*args, self.group, self.threads)


def sinkhorn_knopp(
    logits: torch.Tensor | LinearLogits,
    lam: float,
    tol: float = 1e-3,
    max_iters: int = 1000,
    *,
    group: Group,
    check_every: int = 1,
) -> SinkhornResult:
    """Equal-size pseudo-labels by entropy-regularised optimal transport (SeLa); collective
    over ``group``.

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
    _check_args(logits, lam, tol, max_iters, check_every)
    n, k = logits.shape
    threads = _numba_threads(logits)  # 0: torch kernels
    z_max, n_total = _global_row_stats(logits, group)
    sc = _Scalings.start(n, k, logits.device)
    kernel = _Kernel(logits, z_max, lam, group, threads, n_total, sc)
    it, error, converged, rebuilds = _iterate(kernel, sc, tol, max_iters, check_every)
    log_alpha, log_beta = sc.result(kernel.m, z_max, lam)
    labels = _scaled_argmax(kernel.p, sc.a, threads)
    del kernel  # P
    return SinkhornResult(
        labels=labels.to(logits.device),
        log_alpha=log_alpha,
        log_beta=log_beta,
        iterations=it,
        error=float(error),
        converged=converged,
        rebuilds=rebuilds,
    )


def _iterate(
    kernel: _Kernel, sc: _Scalings, tol: float, max_iters: int, check_every: int
) -> tuple[int, float, bool, int]:
    """The Sinkhorn iterations on ``kernel`` from ``sc`` (both updated in place); returns
    (iterations, error, converged, rebuilds). Every rank takes the same branches: they depend
    only on all-reduced numbers."""
    relax = _Relaxation()
    error, converged, fresh, rebuilds = math.inf, False, True, 0
    it = 0
    for it in range(1, max_iters + 1):
        check = fresh or it % check_every == 0 or it == max_iters
        w = 1.0 if fresh else relax.omega  # fresh: b is not a row scaling of this P yet
        c = kernel.column_sums(sc, w, check)  # [1 or 2, K] f64, over all ranks
        nxt = sc.column_step(c[0], w)
        if check:
            error, drifted, underflow = sc.check(c, nxt)  # host-device sync
            was_fresh, fresh = fresh, False
            if error < tol:
                converged = True
                break
            if it == max_iters:
                break
            if drifted:
                # Scalings drifted: absorb the next column step into P. If a column underflowed
                # (a cluster no sample prefers) its step is unknown: take an exact one instead.
                sc.absorb(nxt, kernel.exact_log_alpha(sc) if underflow else None)
                kernel.rebuild(sc)
                rebuilds += 1
                fresh = True
                continue
            if not was_fresh:
                relax.observe(it, error)
        sc.gauge(nxt)
    return it, error, converged, rebuilds


@dataclass
class RelabelStats:
    iterations: list[int]
    errors: list[float]


def sinkhorn_labels(
    heads: nn.ModuleList,
    features: torch.Tensor,
    lam: float,
    tol: float,
    max_iters: int,
    *,
    group: Group,
    recompute: bool = False,
) -> tuple[torch.Tensor, RelabelStats]:
    """SeLa's label update: labels ``[T, n_r]`` for this rank's rows of the pooled
    ``features`` ``[n_r, D]``, one head's logits block alive at a time. Collective over
    ``group`` (one distributed Sinkhorn-Knopp per head; logits never gathered).

    Peak memory per rank: the features plus two ``[n_r, K]`` float32 blocks (the head's
    logits and Sinkhorn's kernel, which rebuilds from the logits when it re-stabilises), or
    one with ``recompute`` (linear heads: the solver recomputes logits chunks from the
    features, :class:`LinearLogits`). On CUDA the convergence test runs
    every 10 iterations (each is a host-device sync).
    """
    labels, its, errs = [], [], []
    check_every = 10 if features.device.type == "cuda" else 1
    for head in heads:
        z: torch.Tensor | LinearLogits
        if recompute and isinstance(head, nn.Linear):
            z = LinearLogits(features, head.weight, head.bias)
        else:
            z = head_logits(head, features)
        res = sinkhorn_knopp(
            z, lam, tol=tol, max_iters=max_iters, group=group, check_every=check_every
        )
        del z
        labels.append(res.labels.cpu())
        its.append(int(res.iterations))
        errs.append(float(res.error))
    return torch.stack(labels), RelabelStats(its, errs)
