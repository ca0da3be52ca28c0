"""The Sinkhorn kernel P and the passes over it, for :mod:`selfclust.labels.sinkhorn`.

P = exp(λ (z − z_max) + log α₀ − M) is one [n, K] float32 block per rank (row max exactly 1,
entries below e^_LOG_P_MIN of it exactly 0). Everything here reads or writes this rank's rows
only, except :func:`_exact_log_alpha` (one all_reduce_max and one all_reduce_sum of K numbers).

Two backends, chosen by :func:`_numba_threads`: on CPU the fused numba kernels of
:mod:`~selfclust.labels.sinkhorn_numba` (one pass over the block each; the default), or with
``SELFCLUST_SINKHORN_CPU=torch`` BLAS on cache-sized row chunks; on GPUs, matrix-vector products.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from selfclust.collectives import Group, all_reduce_max, all_reduce_sum
from selfclust.labels.sinkhorn_logits import LinearLogits, _blocks
from selfclust.threads import keep_torch_threads

# Kernel entries below e^-87 of their row's max (float32's smallest normal is e^-87.3) are set
# to exactly 0. While the column scalings a stay within e^_ABSORB of each other (absorbed into P
# beyond that: :mod:`~selfclust.labels.sinkhorn_scalings`), a dropped entry carries < e^-20 of its
# row's mass (the row's max entry keeps ≥ e^-_ABSORB of it). Products P_ik a_k can then
# underflow, which is harmless (they are < e^-20 of the row too); the fused CPU kernels flush
# them to zero (FTZ/DAZ, :mod:`~selfclust.labels.sinkhorn_numba`), as GPUs do at speed.
_LOG_P_MIN = -87.0
# CPU: rows and columns are updated chunk by chunk, so the block streams from memory once per
# iteration (the chunk is still in cache for the column product): 1.5-3x faster than two passes.
_CHUNK_BYTES = 4 << 20
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


def _exact_log_alpha(
    logits: torch.Tensor | LinearLogits,
    z_max: torch.Tensor,
    lam: float,
    log_alpha0: torch.Tensor,
    m: torch.Tensor,
    b: torch.Tensor,
    buf: torch.Tensor,
    group: Group,
    threads: int = 0,
) -> torch.Tensor:
    """Column update in the log domain, immune to underflow; ``buf`` ([n, K]) is scratch.

    Returns the new log α₀ = log α₀ − logsumexp_i (log b_i + log P_ik) over all ranks, with P
    untruncated (one all_reduce_max and one all_reduce_sum of K numbers), shifted so that its
    max is 0 (any constant is absorbed by the next row update) and rounded to the float32
    values the rebuilt kernel will see. ``threads > 0``: two fused numba passes that read the
    logits and leave ``buf`` alone; else torch, through ``buf``.
    """
    fused = isinstance(logits, LinearLogits) or (
        logits.dtype in (torch.float32, torch.float64) and logits.is_contiguous()
    )
    if threads and fused:
        return _exact_log_alpha_numba(logits, z_max, lam, log_alpha0, m, b, group, threads)
    k = buf.shape[1]
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


def _exact_log_alpha_numba(
    logits: torch.Tensor | LinearLogits,
    z_max: torch.Tensor,
    lam: float,
    log_alpha0: torch.Tensor,
    m: torch.Tensor,
    b: torch.Tensor,
    group: Group,
    threads: int,
) -> torch.Tensor:
    """:func:`_exact_log_alpha` by two fused numba passes over the logits (float32/float64
    contiguous blocks), which need no scratch block."""
    from selfclust.labels import sinkhorn_numba as sinkhorn_cpu

    k = logits.shape[1]
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


def _scaled_argmax(p: torch.Tensor, a: torch.Tensor, threads: int) -> torch.Tensor:
    """Labels [n] int64 (on CPU for the numba kernels), ``argmax_k P_ik a_k``; the torch path
    scales ``p`` in place (the kernel is not used again)."""
    if threads:
        from selfclust.labels import sinkhorn_numba as sinkhorn_cpu

        return torch.from_numpy(sinkhorn_cpu.scaled_argmax(p.numpy(), a.numpy(), threads))
    if p.shape[0] > 0:
        return p.mul_(a[None, :]).argmax(dim=1)
    return torch.zeros(0, dtype=torch.int64)
