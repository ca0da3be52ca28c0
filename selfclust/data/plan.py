"""The epoch plan: which samples each rank and each of its loader workers reads.

Pure functions of plain lists (the manifest's shard counts, the seed, the epoch); every rank
computes the same plan without communication:

* The unit of assignment is a *piece*: normally one shard. When a set has fewer shards than
  ranks, every shard is split into ``ceil(world_size / num_shards)`` pieces (piece ``j`` of
  ``p`` keeps the shard's samples at positions ``j, j + p, ...``), so no rank is left empty.
* :func:`assign_shards` orders the pieces (fixed order for the label pass; for training a
  global ``(seed, epoch)`` permutation *before* the rank split, so shards move between ranks
  from epoch to epoch) and deals each to the rank with the fewest samples so far.
* Within a rank, pieces are dealt to loader workers the same way (:func:`worker_roles`), and
  the epoch's ``steps_per_epoch`` batches are split between workers in proportion to their
  samples (:func:`split_steps`). A worker whose pieces hold fewer samples than its batches
  need reads them again (re-permuted); one with more drops the surplus. So every rank yields
  exactly the same number of batches and DDP never waits on a rank that ran dry.

Mid-epoch resume depends on torch's DataLoader: with ``batch_size=None`` and several workers
it takes one batch from each worker in turn, skipping workers that are done (round-robin).
:func:`worker_order` is that order, and :func:`resume_point` turns "skip the first ``s``
batches" into the batches each worker skips and the role the first worker plays.
:func:`selfclust.data.streams.train_batches` checks at run time that the DataLoader keeps to
this order ("DataLoader returned worker batches out of round-robin order").
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


def deal(counts: list[int], order: list[int], bins: int) -> list[list[int]]:
    """Greedy balancing: each item, in ``order``, goes to the bin with the fewest samples
    (lowest bin on ties). Bins keep the items in the order they were dealt."""
    heap = [(0, b) for b in range(bins)]
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in order:
        load, b = heapq.heappop(heap)
        out[b].append(i)
        heapq.heappush(heap, (load + counts[i], b))
    return out


def assign_shards(
    counts: list[int], world_size: int, seed: int, epoch: int | None
) -> list[list[int]]:
    """Shard indices for each rank, computed from the manifest counts alone.

    ``epoch=None`` (label pass) keeps the manifest order; otherwise the shards are permuted
    with ``np.random.default_rng((seed, epoch))`` before dealing. Each shard goes to the rank
    with the fewest samples so far, so rank loads differ by at most the largest shard.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"counts must be a non-empty list of sample counts, got {counts!r}")
    if epoch is None:
        order = list(range(len(counts)))
    else:
        order = np.random.default_rng((seed, epoch)).permutation(len(counts)).tolist()
    return deal(list(counts), order, world_size)


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches per rank per epoch: ``num_samples // (world_size * batch_size)``."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
    steps = num_samples // (world_size * batch_size)
    if steps == 0:
        raise ValueError(
            f"dataset too small for batch_size × world_size: {num_samples} samples < "
            f"{batch_size} × {world_size}; lower the batch size"
        )
    return steps


@dataclass(frozen=True)
class Piece:
    """Samples ``part, part + nparts, ...`` of the shard at ``url`` (``count`` of them)."""

    url: str
    first_idx: int
    shard_count: int
    part: int  # keeps the shard's samples at positions part, part + nparts, ...
    nparts: int
    count: int


def pieces(
    urls: list[str], first_idx: list[int], counts: list[int], world_size: int
) -> list[Piece]:
    """The shards of a set as pieces: whole shards, or each split into
    ``ceil(world_size / len(urls))`` parts when there are fewer shards than ranks. Empty
    pieces are left out."""
    nparts = -(-world_size // len(urls))  # ceil: at least one piece per rank
    out = [
        Piece(url, first, count, j, nparts, len(range(j, count, nparts)))
        for url, first, count in zip(urls, first_idx, counts, strict=True)
        for j in range(nparts)
    ]
    return [p for p in out if p.count > 0]


def rank_pieces(
    all_pieces: list[Piece], rank: int, world_size: int, seed: int, epoch: int | None
) -> list[Piece]:
    """The pieces of ``rank``, in the order :func:`assign_shards` dealt them."""
    mine = assign_shards([p.count for p in all_pieces], world_size, seed, epoch)[rank]
    return [all_pieces[i] for i in mine]


def worker_roles(mine: list[Piece], num_workers: int) -> list[list[Piece]]:
    """A rank's pieces dealt to ``max(1, min(num_workers, len(mine)))`` loader-worker roles."""
    n_roles = max(1, min(num_workers, len(mine)))
    dealt = deal([p.count for p in mine], list(range(len(mine))), n_roles)
    return [[mine[i] for i in d] for d in dealt]


def split_steps(steps: int, loads: list[int], batch_size: int) -> list[int]:
    """Split ``steps`` between workers in proportion to their samples ``loads``: floors
    first, then one more step each to the workers with the most unused samples, which keeps
    refills (repeated samples) to at most ``(workers - 1) * batch_size`` per rank."""
    total = sum(loads)
    share = [steps * n // total for n in loads]
    spare = sorted(range(len(loads)), key=lambda q: (share[q] * batch_size - loads[q], q))
    for q in spare[: steps - sum(share)]:
        share[q] += 1
    return share


def worker_order(steps: list[int]) -> list[int]:
    """Which worker produces each batch: DataLoader takes one batch from each worker in turn,
    skipping workers that are done."""
    return [q for r in range(max(steps, default=0)) for q in range(len(steps)) if steps[q] > r]


def resume_point(order: list[int], skip_steps: int, n_roles: int) -> tuple[list[int], int]:
    """Where an epoch resumed at batch ``skip_steps`` starts, given the epoch's
    :func:`worker_order`: (batches each role skips, the role of the first batch read). The
    loader's worker ``k`` then plays role ``(k + rotate) % n_roles``, so the round-robin
    starts with the right role. ``rotate`` is 0 when nothing is left to read."""
    skips = [order[:skip_steps].count(q) for q in range(n_roles)]
    rotate = order[skip_steps] if skip_steps < len(order) else 0
    return skips, rotate
