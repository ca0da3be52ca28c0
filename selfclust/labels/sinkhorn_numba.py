"""Fused CPU kernels for :mod:`selfclust.labels.sinkhorn` (numba), one pass over the block each.

(Over STYLE's ~300 lines on purpose: it is one unit, six parallel kernels and the private
helpers they all inline, the FTZ/DAZ (MXCSR) intrinsics, the fast exp and the 8-wide max;
a split would put the numerics that must agree in two files. Its only caller is
:mod:`~selfclust.labels.sinkhorn_kernels`, which holds the torch equivalents.)

Why: with BLAS, one Sinkhorn sweep is two matrix-vector products (rows ``P @ a``, then the
column sums ``b @ P`` on the same cache-sized chunk): ~2× a plain read of the block even with
the chunk in cache. Here every row is read from memory once: its dot with ``a`` while it
streams into L1, then ``b_i · row`` is added to the column sums from L1. Rebuilding the kernel
``P = exp(s − max s)`` is one pass too (torch: ~7 passes, and a slow ``exp``), which also does
the first sweep on the new kernel; the exact log-domain column step reads the logits twice and
writes nothing (torch: ~8 passes through a scratch block).

Rows are split evenly over ``tasks`` threads; each keeps float32 column sums over at most
``_FLUSH`` rows and adds them into float64 totals, so the column sums are at least as accurate
as a float32 BLAS ``gemv`` over the block. Results depend on the thread count only by rounding.

Never call these in a forked DataLoader worker (numba's OpenMP layer is not fork-safe):
:mod:`selfclust.labels.sinkhorn_kernels` only uses them in the training process. numba's pool
(the system libgomp) is separate from torch's; its first launch resets torch's thread count,
which :func:`selfclust.labels.sinkhorn_kernels._numba_threads` restores.
"""

from __future__ import annotations

import platform
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# float32 column sums cover at most this many rows before going into the float64 totals.
_FLUSH = 256
# Sums may be reordered (vectorised, as BLAS does) and a*b+c fused; nothing assumes away
# NaN/inf or changes a result beyond float32 rounding.
_FM_SWEEP = {"reassoc", "contract", "nsz"}
# The kernel build may also assume no NaN: the logits were checked finite before, and
# λ (z − max z) + log α₀ is then finite or −inf (overflow), never NaN.
_FM_BUILD = {"nnan", "reassoc", "contract", "nsz"}


# MXCSR bits: flush denormal results to zero (FTZ, 0x8000), read denormal inputs as zero
# (DAZ, 0x40). Only x86 has MXCSR; elsewhere the kernels run with the FP mode they find.
_FTZ_DAZ = 0x8040
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _mxcsr_op(builder: Any, name: str, slot: Any) -> None:
    """Emits ``llvm.x86.sse.<name>`` (``stmxcsr``: MXCSR into ``slot``, ``ldmxcsr``: back)."""
    ptr_t = ir.IntType(8).as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [ptr_t])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.x86.sse.{name}")
    builder.call(fn, [builder.bitcast(slot, ptr_t)])


@intrinsic
def _mxcsr(typingctx: Any, flush: Any) -> Any:
    """x86: returns this thread's MXCSR, and with ``flush`` set turns on FTZ and DAZ;
    ``_mxcsr_restore`` puts a saved value back. A no-op (returns 0) elsewhere.

    Why: the spread of column scalings the kernels allow (see
    :mod:`~selfclust.labels.sinkhorn_scalings`) makes products ``P_ik a_k`` of ~e^-150 common.
    Their exact value is irrelevant (they are < e^-20 of their row's mass), but on Intel cores
    an op with a denormal or underflowing result can take a microcode assist (~100+ cycles)
    unless FTZ is on. numba sets no FP mode itself, and the threads are numba's, so each
    parallel task sets and restores its own.
    """
    sig = types.int32(types.boolean)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        if not _X86:
            return ir.Constant(i32, 0)
        slot = cgutils.alloca_once(builder, i32)
        _mxcsr_op(builder, "stmxcsr", slot)
        old = builder.load(slot)
        with builder.if_then(args[0]):
            builder.store(builder.or_(old, ir.Constant(i32, _FTZ_DAZ)), slot)
            _mxcsr_op(builder, "ldmxcsr", slot)
        return old

    return sig, codegen


@intrinsic
def _mxcsr_restore(typingctx: Any, saved: Any) -> Any:
    """Sets MXCSR to ``saved`` (a value from ``_mxcsr``); a no-op off x86."""
    sig = types.none(types.int32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        if _X86:
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            builder.store(args[0], slot)
            _mxcsr_op(builder, "ldmxcsr", slot)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True)
def flushed_product(x, y):  # type: ignore[no-untyped-def]
    """``(x * y, MXCSR before, inside, after)``: the product as the kernels compute it, with
    FTZ/DAZ on (for the test: a denormal product reads 0 on x86; MXCSR reads 0 elsewhere)."""
    saved = _mxcsr(True)
    out = x * y
    inside = _mxcsr(False)
    _mxcsr_restore(saved)
    return out, saved, inside, _mxcsr(False)


def set_threads(n: int) -> int:
    """Use ``n`` numba threads (capped at the pool size, ≥ 1); returns the count used."""
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    numba.set_num_threads(n)
    return n


@intrinsic
def _f32_from_bits(typingctx: Any, bits: Any) -> Any:
    """Reinterpret an int32 as float32 (2^e without a table lookup: vectorises)."""
    sig = types.float32(types.int32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@numba.njit(inline="always", fastmath={"contract"})
def _exp_neg(d: Any) -> Any:
    """float32 e^d for −87 < d ≤ 0, within 1.2 ulp of the exact value (the test checks it).

    d = −q ln 2 + r with |r| ≤ ln 2 / 2 (ln 2 split in two, so q ln 2 is exact), e^r by its
    degree-7 Taylor polynomial (truncation < 3e-9 relative), times 2^−q built from its bits.
    """
    q = np.floor(d * np.float32(-1.4426950408889634) + np.float32(0.5))  # round(−d / ln 2)
    r = (d + q * np.float32(0.693359375)) + q * np.float32(-2.1219444005469057e-4)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _f32_from_bits((np.int32(127) - np.int32(q)) << 23)  # type: ignore[call-arg]


@numba.njit(inline="always", fastmath=_FM_SWEEP)
def _term(x: Any, a: Any, lam: Any, shift: Any, out: Any, j: int, product: bool) -> Any:
    """``v_j`` of :func:`_max8` (``out[j] = v_j`` for the kernel exponent)."""
    if product:
        return x[j] * a[j]
    v = a[j] + lam * (np.float32(x[j]) - shift)
    out[j] = v
    return v


@numba.njit(inline="always", fastmath=_FM_SWEEP)
def _max8(x: Any, a: Any, lam: Any, shift: Any, out: Any, product: bool) -> Any:
    """Exact ``max_j v_j`` over a row (−inf if empty): ``v_j = x_j a_j`` (``product``), or the
    kernel exponent ``v_j = a_j + lam (x_j − shift)`` in float32, also written to ``out``.
    Eight running maxima, so that LLVM vectorises it: a single ``mx = max(mx, v)`` chain stays
    scalar (3.5× slower; it was the largest part of a kernel build)."""
    k = x.shape[0]
    kk = k - k % 8
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = np.float32(-np.inf)
    for j in range(0, kk, 8):
        v0 = _term(x, a, lam, shift, out, j, product)
        v1 = _term(x, a, lam, shift, out, j + 1, product)
        v2 = _term(x, a, lam, shift, out, j + 2, product)
        v3 = _term(x, a, lam, shift, out, j + 3, product)
        v4 = _term(x, a, lam, shift, out, j + 4, product)
        v5 = _term(x, a, lam, shift, out, j + 5, product)
        v6 = _term(x, a, lam, shift, out, j + 6, product)
        v7 = _term(x, a, lam, shift, out, j + 7, product)
        m0 = v0 if v0 > m0 else m0
        m1 = v1 if v1 > m1 else m1
        m2 = v2 if v2 > m2 else m2
        m3 = v3 if v3 > m3 else m3
        m4 = v4 if v4 > m4 else m4
        m5 = v5 if v5 > m5 else m5
        m6 = v6 if v6 > m6 else m6
        m7 = v7 if v7 > m7 else m7
    for j in range(kk, k):
        v = _term(x, a, lam, shift, out, j, product)
        m0 = v if v > m0 else m0
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return m4 if m4 > m0 else m0


@numba.njit(cache=True)
def exp_neg(x: Any) -> Any:
    """``_exp_neg`` over a float32 array (for the accuracy test)."""
    out = np.empty_like(x)
    for j in range(x.shape[0]):
        out[j] = _exp_neg(max(x[j], np.float32(-87.0)))
    return out


@numba.njit(parallel=True, cache=True, fastmath=_FM_BUILD)
def build_kernel(z, z_max, lam, log_alpha0, log_p_min, out, m, inv_n, a, b, b_ex, tasks):  # type: ignore[no-untyped-def]
    """``out = exp(s − M)`` with ``s = λ (z − z_max) + log α₀`` and ``M_i = max_k s_ik``,
    entries with ``s − M ≤ log_p_min`` set to exactly 0; writes ``m = M``. One pass: each
    row of z is read once and its s stays in L1 for the max and the exp.

    The first sweep on a new kernel (column scaling ``a`` [K] float32, ω = 1, with check) is
    done in the same pass: ``b = b_ex = inv_n / (P @ a)``; returns its column sums [2, K]
    float64 as :func:`sweep`.

    z [n, K] float32/float64, z_max [n] float32, log_alpha0 [K] float32, out [n, K] float32.
    """
    n, k = z.shape
    lamf = np.float32(lam)
    lo = np.float32(log_p_min)
    floor = np.float32(max(log_p_min - 10.0, -87.0))  # keeps _exp_neg's argument in range
    inv = np.float32(inv_n)
    totals = np.zeros((tasks, k), np.float64)
    for t in prange(tasks):
        saved = _mxcsr(True)
        lo_i, hi_i = t * n // tasks, (t + 1) * n // tasks
        c = np.zeros(k, np.float32)
        for start in range(lo_i, hi_i, _FLUSH):
            for i in range(start, min(start + _FLUSH, hi_i)):
                zi, oi, zm = z[i], out[i], z_max[i]
                mx = _max8(zi, log_alpha0, lamf, zm, oi, False)  # oi = the exponents s
                m[i] = mx
                row_sum = np.float32(0.0)
                for j in range(k):
                    d = max(oi[j] - mx, floor)
                    e = _exp_neg(d)
                    e = e if d > lo else np.float32(0.0)
                    oi[j] = e
                    row_sum += e * a[j]
                e = inv / row_sum  # row max 1 and a ≥ e^-73: no overflow
                b[i] = e
                b_ex[i] = e
                for j in range(k):
                    c[j] += e * oi[j]
            for j in range(k):
                totals[t, j] += c[j]
                c[j] = 0.0
        _mxcsr_restore(saved)
    cols = np.zeros((2, k), np.float64)
    for t in range(tasks):
        cols[0] += totals[t]
    cols[1] = cols[0]
    return cols


@numba.njit(parallel=True, cache=True, fastmath=_FM_SWEEP)
def sweep(p, a, b, b_ex, inv_n, omega, check, tasks):  # type: ignore[no-untyped-def]
    """One pass over P [n, K] float32; same contract as
    :func:`selfclust.labels.sinkhorn_kernels._sweep`: ``e_i = inv_n / (P @ a)_i``,
    ``b_i ← e_i (e_i / b_i)^(ω−1)`` in place, ``b_ex = e`` on check iterations; returns the
    column sums [2, K] float64: ``b @ P`` and (check) ``e @ P``.
    """
    n, k = p.shape
    totals = np.zeros((tasks, 2, k), np.float64)
    inv = np.float32(inv_n)
    w1 = np.float32(omega - 1.0)
    relax = omega != 1.0
    both = check and relax  # with ω = 1, b = e and the two sums coincide
    for t in prange(tasks):
        saved = _mxcsr(True)
        lo, hi = t * n // tasks, (t + 1) * n // tasks
        c0 = np.zeros(k, np.float32)
        c1 = np.zeros(k, np.float32)
        for start in range(lo, hi, _FLUSH):
            for i in range(start, min(start + _FLUSH, hi)):
                row = p[i]
                s = np.float32(0.0)
                for j in range(k):  # the row streams from memory into L1
                    s += row[j] * a[j]
                e = inv / s
                bi = e * (e / b[i]) ** w1 if relax else e
                b[i] = bi
                if check:
                    b_ex[i] = e
                if both:
                    for j in range(k):  # the row is in L1 now
                        c0[j] += bi * row[j]
                        c1[j] += e * row[j]
                else:
                    for j in range(k):
                        c0[j] += bi * row[j]
            for j in range(k):
                totals[t, 0, j] += c0[j]
                totals[t, 1, j] += c1[j]
                c0[j] = 0.0
                c1[j] = 0.0
        _mxcsr_restore(saved)
    c = np.zeros((2, k), np.float64)
    for t in range(tasks):
        c += totals[t]
    if check and not relax:
        c[1] = c[0]
    return c


@numba.njit(parallel=True, cache=True, fastmath=_FM_SWEEP)
def scaled_argmax(p, a, tasks):  # type: ignore[no-untyped-def]
    """``argmax_k P_ik a_k`` per row (first index on ties, as torch), without writing P."""
    n, k = p.shape
    out = np.zeros(n, np.int64)
    for t in prange(tasks):
        saved = _mxcsr(True)
        for i in range(t * n // tasks, (t + 1) * n // tasks):
            row = p[i]
            zero = np.float32(0.0)
            best = _max8(row, a, zero, zero, row, True)  # vectorised; then the first index
            arg = 0  # that reaches it (the same float32 products: exact)
            while arg < k - 1 and row[arg] * a[arg] != best:
                arg += 1
            out[i] = arg
        _mxcsr_restore(saved)
    return out


@numba.njit(parallel=True, cache=True, fastmath=_FM_SWEEP)
def log_col_max(z, z_max, lam, log_alpha0, m, log_b, tasks):  # type: ignore[no-untyped-def]
    """``max_i s_ik`` ([K] float64) with ``s_ik = λ (z_ik − z_max_i) + log α₀_k − m_i + log b_i``
    in float32 (the log-domain column step's first pass; nothing is written per entry)."""
    n, k = z.shape
    part = np.full((tasks, k), -np.inf, np.float32)
    lamf = np.float32(lam)
    for t in prange(tasks):
        cm = part[t]
        for i in range(t * n // tasks, (t + 1) * n // tasks):
            zi, zm, mi, lb = z[i], z_max[i], m[i], log_b[i]
            for j in range(k):
                s = ((log_alpha0[j] + lamf * (np.float32(zi[j]) - zm)) - mi) + lb
                cm[j] = max(cm[j], s)
    out = np.full(k, -np.inf, np.float64)
    for t in range(tasks):
        for j in range(k):
            out[j] = max(out[j], np.float64(part[t, j]))
    return out


@numba.njit(parallel=True, cache=True, fastmath=_FM_SWEEP)
def log_col_sum(z, z_max, lam, log_alpha0, m, log_b, col_max, tasks):  # type: ignore[no-untyped-def]
    """``Σ_i exp(max(s_ik − col_max_k, −87))`` ([K] float64), s as in :func:`log_col_max` and
    ``col_max`` [K] float32 its all-reduced result (so every exponent is ≤ 0)."""
    n, k = z.shape
    totals = np.zeros((tasks, k), np.float64)
    lamf = np.float32(lam)
    floor = np.float32(-87.0)
    for t in prange(tasks):
        lo, hi = t * n // tasks, (t + 1) * n // tasks
        c = np.zeros(k, np.float32)
        for start in range(lo, hi, _FLUSH):
            for i in range(start, min(start + _FLUSH, hi)):
                zi, zm, mi, lb = z[i], z_max[i], m[i], log_b[i]
                for j in range(k):
                    s = ((log_alpha0[j] + lamf * (np.float32(zi[j]) - zm)) - mi) + lb
                    c[j] += _exp_neg(max(s - col_max[j], floor))
            for j in range(k):
                totals[t, j] += c[j]
                c[j] = 0.0
    out = np.zeros(k, np.float64)
    for t in range(tasks):
        out += totals[t]
    return out
