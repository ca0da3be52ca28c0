"""The public Sinkhorn-Knopp entry point: ``from selfclust.sinkhorn import sinkhorn_knopp``.

The solver lives in :mod:`selfclust.labels.sinkhorn` (with its numba kernels in
:mod:`selfclust.labels.sinkhorn_numba`); this module names the stable API.
"""

from selfclust.labels.sinkhorn import LinearLogits, SinkhornResult, sinkhorn_knopp

__all__ = ["LinearLogits", "SinkhornResult", "sinkhorn_knopp"]
