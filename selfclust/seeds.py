"""Every seed selfclust derives from ``cfg.seed``, in one place.

Each rule is a pure function of the run's seed and the position it is drawn for, so a resumed
or re-run job draws the same numbers without saving RNG state. The formulas are fixed: a
checkpoint, a digest or a published figure depends on them, so change none without saying so.
"""

from __future__ import annotations

import numpy as np


def mix(*parts: int) -> int:
    """A 64-bit seed from several integers (numpy's SeedSequence): for streams keyed by
    several coordinates (run seed, epoch, rank, shard role, cycle)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def head_seed(seed: int, head: int) -> int:
    """SeLa's random first labels of head ``head`` (a permutation of 0..N-1 modulo K)."""
    return seed * 1000 + head


def sample_order_seed(seed: int) -> int:
    """The permutation of global indices whose first entries form a fixed-size sample
    (k-means, manifold pools): the same whatever the number of ranks."""
    return seed + 7919


def candidate_seed(seed: int, candidate: int) -> int:
    """The ``candidate``-th UMAP + GMM partition among several of one label update."""
    return seed + 7919 * candidate


def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout noise and sampled latents of one training step on one rank (DEC/DEPICT/DGG)."""
    return (seed * 1_000_003 + step) * 1009 + rank


def probe_epoch_seed(seed: int, epoch: int) -> int:
    """The order of the linear probe's training features in one epoch."""
    return seed * 100003 + epoch
