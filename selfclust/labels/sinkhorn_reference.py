"""The readable specification of :func:`selfclust.labels.sinkhorn.sinkhorn_knopp`: plain
Sinkhorn-Knopp in float64 and the log domain, on one process, with no stabilisation tricks.

SeLa's problem (Asano et al., ICLR 2020, Eq. 4): find Q = diag(β) exp(λ z) diag(α) with rows
summing to 1/N and columns to 1/K. Alternately, with s = λ z,

    log β_i = −log N − logsumexp_k (s_ik + log α_k)     (rows exact)
    log α_k = −log K − logsumexp_i (s_ik + log β_i)     (columns exact)

and stop once the columns of the plan with exact rows are within ``tol`` of 1/K:
``max_k |K Σ_i Q_ik − 1| < tol``, the error :func:`sinkhorn_knopp` reports. Slow (no
over-relaxation, a dense float64 copy) and exact enough to be the tests' oracle.
"""

from __future__ import annotations

import math

import torch


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """torch.logsumexp, but terms below e^-600 of the max are clamped (float64 denormals crawl)."""
    m = x.amax(dim=dim, keepdim=True)
    return (m + (x - m).clamp_(min=-600.0).exp_().sum(dim=dim, keepdim=True).log_()).squeeze(dim)


def log_sinkhorn_f64(
    logits: torch.Tensor, lam: float, tol: float = 1e-6, max_iters: int = 20000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 log-domain Sinkhorn on ``logits`` [N, K]; returns (labels [N] int64, log α [K]).

    Raises:
        RuntimeError: not converged to ``tol`` within ``max_iters`` iterations.
    """
    s = lam * logits.to(torch.float64)  # [N, K]
    n, k = s.shape
    log_a = torch.zeros(k, dtype=torch.float64)
    for _ in range(max_iters):
        log_b = -math.log(n) - _logsumexp(s + log_a, dim=1)  # rows exact
        log_col = _logsumexp(s + log_b[:, None], dim=0)  # [K], without a
        if (k * (log_col + log_a).exp() - 1).abs().max() < tol:
            return (s + log_a).argmax(dim=1), log_a
        log_a = -math.log(k) - log_col
    raise RuntimeError(f"reference Sinkhorn did not reach tol={tol} in {max_iters} iterations")
