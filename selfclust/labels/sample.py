"""The seeded global sample that k-means and UMAP + GMM cluster: a pure function of
(N, samples, seed), so every rank knows which of its rows are in it without talking, and the
pool is the same on every rank and for every number of ranks."""

from __future__ import annotations

import torch

from selfclust import collectives as C
from selfclust.seeds import sample_order_seed


def global_sample(num_samples: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded global sample of ``min(samples, N)`` indices: a mask ``[N]`` and the sorted
    indices. A pure function of (N, samples, seed), so every rank knows it without talking."""
    order = torch.randperm(
        num_samples, generator=torch.Generator().manual_seed(sample_order_seed(seed))
    )
    position = torch.empty_like(order)
    position[order] = torch.arange(num_samples)
    mask = position < samples
    return mask, torch.nonzero(mask).squeeze(1)


def sample_pool(
    features: torch.Tensor,
    idx: torch.Tensor,
    num_samples: int,
    samples: int,
    seed: int,
    group: C.Group,
) -> torch.Tensor:
    """Rows of a seeded global sample of ``min(samples, N)`` indices, sorted by idx.

    Collective over ``group``: each rank sends only its rows of the sample (about
    ``samples · n_r / N``); the result is the same on every rank and for every number of ranks.
    """
    mine = global_sample(num_samples, samples, seed)[0][idx]
    pool_idx = C.all_gather_cat(idx[mine], group)  # int64: exact at any N
    pool = C.all_gather_cat(features[mine.to(features.device)].float().cpu(), group)
    return pool[torch.argsort(pool_idx)]
