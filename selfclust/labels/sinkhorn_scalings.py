"""The scalings of the Sinkhorn plan between iterations, for :mod:`selfclust.labels.sinkhorn`.

The plan is ``Q_ik = b_i P_ik a_k`` with the kernel ``P = exp(λ (z − z_max) + log α₀ − M)``
(:mod:`~selfclust.labels.sinkhorn_kernels`): one float32 block in which each row is shifted by
its max (exact, absorbed in β) and a reference column scaling α₀ is absorbed too, so the
scalings a, b the iterations see stay near 1. When they drift too far apart, or a column
underflows (a cluster no sample prefers, at λ = 25), one exact log-domain column update is done
and absorbed into a rebuilt P (the "absorption" stabilisation of Schmitzer, 2019), built a little
ahead along the direction the scalings are moving. log α₀ and the shifts are float64/float32
vectors: nothing becomes inf or NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Absorb the column scalings into P (with an exact log-domain step) once the log-spread of a
# exceeds this (_LOG_P_MIN + _ABSORB = -20: the dropped entries' bound, see
# :mod:`~selfclust.labels.sinkhorn_kernels`).
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
# Column sums below this (float64) count as underflowed.
_C_FLOOR = 1e-300
# A column whose float32 sum is below this lost its digits to underflow: absorbing its step
# needs the exact log-domain update.
_C_UNDERFLOW = 1e-30


@dataclass
class _Scalings:
    """This rank's scalings: the columns' (the same on every rank) and its own rows'."""

    k: int  # clusters K
    log_alpha0: torch.Tensor  # [K] f64, absorbed in P
    a: torch.Tensor  # [K] f32, column scaling relative to P
    log_a: torch.Tensor  # [K] f64, log a as applied
    b: torch.Tensor  # [n] f32, row scaling (relaxed)
    b_ex: torch.Tensor  # [n] f32, exact rows, set on checks
    built: torch.Tensor  # [K] f64, the scalings at the last build (α₀ + log a), for the drift

    @classmethod
    def start(cls, n: int, k: int, device: torch.device) -> _Scalings:
        """α₀ = 1 (absorbed in the first P), a = 1; b and b_ex are written by the first sweep."""
        log_alpha0 = torch.zeros(k, dtype=torch.float64, device=device)
        return cls(
            k=k,
            log_alpha0=log_alpha0,
            a=torch.ones(k, dtype=torch.float32, device=device),
            log_a=torch.zeros(k, dtype=torch.float64, device=device),
            b=torch.empty(n, dtype=torch.float32, device=device),
            b_ex=torch.empty(n, dtype=torch.float32, device=device),
            built=log_alpha0,
        )

    def rows(self, inv_n: float) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
        """``(b, b_ex, 1/N, a)``: what a kernel build's first sweep reads and writes."""
        return (self.b, self.b_ex, inv_n, self.a)

    def column_step(self, c0: torch.Tensor, w: float) -> torch.Tensor:
        """The next log a [K] f64, relaxed by ``w``, from the global column sums ``c0`` [K] f64."""
        target = -math.log(self.k) - c0.clamp(min=_C_FLOOR).log()  # exact column step, [K] f64
        return target if w == 1.0 else torch.lerp(self.log_a, target, w)  # (1−ω) log a + ω target

    def check(self, c: torch.Tensor, nxt: torch.Tensor) -> tuple[float, bool, bool]:
        """(error, drifted, underflow) from the check's column sums ``c`` [2, K] f64 and the next
        log a ``nxt``: the error of the plan with exact rows, whether the spread of ``nxt``
        calls for an absorption, and whether a column underflowed. One host-device sync."""
        err_t = (c[1] * self.a.to(torch.float64) * self.k - 1.0).abs().max()
        spread_t = nxt.max() - nxt.min()
        error, spread, c_min = torch.stack([err_t, spread_t, c[0].min()]).tolist()  # sync
        return error, not spread <= _ABSORB, c_min < _C_UNDERFLOW

    def absorb(self, nxt: torch.Tensor, exact: torch.Tensor | None) -> None:
        """Absorbs the next column step ``nxt`` into a new log α₀, or takes the ``exact``
        log-domain one (when a column underflowed, its step is unknown); the kernel must then
        be rebuilt from ``log_alpha0``, with ``a`` undoing the part built ahead."""
        ahead = torch.zeros_like(self.log_alpha0)
        if exact is not None:
            self.log_alpha0 = exact
        else:
            eff = self.log_alpha0 + nxt  # the scalings the plan has now
            drift = eff - self.built
            moved = float(drift.max() - drift.min())  # > _ABSORB, unless just built
            if moved > 1.0:
                ahead = drift * (_AHEAD * _ABSORB / moved)
            eff = eff + ahead
            self.log_alpha0 = (eff - eff.max()).to(torch.float32).double()
        self.built = self.log_alpha0 - ahead
        self.log_a = ahead.min() - ahead  # the plan is unchanged: a undoes `ahead`, max 0
        self.a = self.log_a.exp().to(torch.float32)

    def gauge(self, nxt: torch.Tensor) -> None:
        """Applies the column step ``nxt``. Gauge: keep max log a = 0 (a ≤ 1, no overflow in
        P @ a) and move the constant into b, so that the relaxed row step compares b_ex with a
        b of the same gauge."""
        shift = nxt.max()
        self.log_a = (nxt - shift).clamp_(min=_LOG_A_FLOOR)
        self.b.mul_(shift.exp().to(torch.float32))
        self.a = self.log_a.exp().to(torch.float32)

    def result(
        self, m: torch.Tensor, z_max: torch.Tensor, lam: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log α [K], log β [n]) float64 of the plan with the exact rows of the last (check)
        iteration: Q_ik = b_i P_ik a_k = exp(log b_i − M_i − λ z_max_i + λ z_ik + log α₀_k +
        log a_k), for the kernel's row shifts ``m`` and the row maxima ``z_max``."""
        log_alpha = self.log_alpha0 + self.a.to(torch.float64).log()
        log_beta = (
            self.b_ex.to(torch.float64).log() - m.to(torch.float64) - lam * z_max.to(torch.float64)
        )
        return log_alpha, log_beta
