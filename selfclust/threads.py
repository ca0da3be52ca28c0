"""Thread-count hygiene beside libraries that bring their own OpenMP pool."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Put torch's intra-op thread count back on exit if the body changed it.

    numba's OpenMP layer (UMAP, pynndescent, selfclust's Sinkhorn kernels) resets it when its
    pool first starts: a worker would then train on more threads than it was given, and a run
    resumed in a fresh process (which has not started that pool) would round differently.
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
