"""Over-relaxation (SOR) of the Sinkhorn half-steps, for :mod:`selfclust.labels.sinkhorn`.

Plain Sinkhorn contracts at a rate ρ that tends to 1 as the logits grow confident or λ grows
(on a trained MNIST head at λ = 25 it needs ~5,500 iterations for 1e-3). Both half-steps are
therefore over-relaxed in the log domain, ``log b ← (1−ω) log b + ω log b_exact`` and likewise
for a: for the two-block (2-cyclic) iteration, SOR theory gives the optimal
ω* = 2 / (1 + √(1−ρ)) and the rate ω* − 1 ≈ 1 − 2√(1−ρ). ρ is estimated from the error decay
between checks (ω = 1 at first, then inverting the SOR eigenvalue relation
(μ + ω − 1)² = μ ω² ρ), so no tuning is needed; 30-40× fewer iterations at λ = 25-50.
The error is always measured on the plan with *exact* rows, so the contract is unchanged.
"""

from __future__ import annotations

import math

# Over-relaxation: ω stays 1 for the first _OMEGA_WARMUP iterations (the transient is not
# linear), is re-estimated over windows of at least _OMEGA_WINDOW iterations, never exceeds
# _OMEGA_MAX (rate ω − 1 if ρ is over-estimated) and is halved towards 1 if the error grows.
_OMEGA_WARMUP = 20
_OMEGA_WINDOW = 10
_OMEGA_MAX = 1.98


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


class _Relaxation:
    """The ω controller: ``omega`` for the next iterations, re-estimated from the errors of the
    checks it is shown (:meth:`observe`)."""

    def __init__(self) -> None:
        self.omega = 1.0
        self.anchor = (0, math.inf)  # the (iteration, error) the current window started at

    def observe(self, it: int, error: float) -> None:
        """The error at check iteration ``it`` (not the first check on a new kernel)."""
        if it < _OMEGA_WARMUP:
            return
        start, err0 = self.anchor
        if it - start >= _OMEGA_WINDOW and math.isfinite(err0):
            self.omega = _next_omega(self.omega, (error / err0) ** (1.0 / (it - start)))
        if it - start >= _OMEGA_WINDOW or not math.isfinite(err0):
            self.anchor = (it, error)
