"""The epoch plan (selfclust.data.plan) on plain lists: dealing, rank assignment, step counts,
pieces, the split of steps between loader workers and the resume arithmetic."""

from __future__ import annotations

import pytest

from selfclust.data.plan import (
    Piece,
    assign_shards,
    deal,
    pieces,
    rank_pieces,
    resume_point,
    split_steps,
    steps_per_epoch,
    worker_order,
    worker_roles,
)


@pytest.mark.parametrize(
    "counts,order,bins,expected",
    [
        ([5, 3, 2], [0, 1, 2], 2, [[0], [1, 2]]),  # to the lightest bin
        ([1, 1, 1, 1], [0, 1, 2, 3], 2, [[0, 2], [1, 3]]),  # ties: the lowest bin
        ([1, 1, 1], [2, 0, 1], 3, [[2], [0], [1]]),  # dealt in ``order``
        ([10, 1, 1, 1], [0, 1, 2, 3], 2, [[0], [1, 2, 3]]),
        ([4], [0], 3, [[0], [], []]),  # more bins than items
        ([], [], 2, [[], []]),
    ],
)
def test_deal(counts, order, bins, expected) -> None:
    assert deal(counts, order, bins) == expected


@pytest.mark.parametrize(
    "counts,world_size,seed,epoch,expected",
    [
        ([100, 100, 97], 2, 0, None, [[0, 2], [1]]),  # label pass: manifest order
        ([100, 100, 97], 2, 9, None, [[0, 2], [1]]),  # ... whatever the seed
        ([100, 100, 97], 1, 0, 3, [[2, 1, 0]]),  # one rank: every shard, permuted
        # the (seed, epoch) permutation before the deal: pinned, it is the data order
        ([5, 300, 7, 80, 1, 64], 2, 3, 1, [[1], [2, 0, 4, 5, 3]]),
        ([5, 300, 7, 80, 1, 64], 3, 0, 0, [[3], [2, 4, 0, 1], [5]]),
    ],
)
def test_assign_shards(counts, world_size, seed, epoch, expected) -> None:
    assert assign_shards(counts, world_size, seed, epoch) == expected


@pytest.mark.parametrize(
    "counts,world_size,match",
    [
        ([10], 0, "world_size must be >= 1, got 0"),
        ([], 2, "counts must be a non-empty list"),
        ([3, -1], 2, "counts must be a non-empty list"),
    ],
)
def test_assign_shards_refuses(counts, world_size, match) -> None:
    with pytest.raises(ValueError, match=match):
        assign_shards(counts, world_size, 0, None)


@pytest.mark.parametrize(
    "num_samples,world_size,batch_size,expected",
    [(1797, 3, 32, 18), (1797, 1, 1797, 1), (100, 2, 7, 7), (64, 4, 16, 1)],
)
def test_steps_per_epoch(num_samples, world_size, batch_size, expected) -> None:
    assert steps_per_epoch(num_samples, world_size, batch_size) == expected


@pytest.mark.parametrize(
    "num_samples,world_size,batch_size,match",
    [
        (1797, 2, 1000, "too small for batch_size × world_size: 1797 samples < 1000 × 2"),
        (10, 1, 0, "batch_size and world_size must be >= 1, got 0, 1"),
        (10, 0, 1, "batch_size and world_size must be >= 1, got 1, 0"),
    ],
)
def test_steps_per_epoch_refuses(num_samples, world_size, batch_size, match) -> None:
    with pytest.raises(ValueError, match=match):
        steps_per_epoch(num_samples, world_size, batch_size)


@pytest.mark.parametrize(
    "counts,world_size,expected",
    [
        # as many shards as ranks or more: whole shards
        ([10, 5], 1, [(0, 10, 0, 1, 10), (10, 5, 0, 1, 5)]),
        ([10, 5], 2, [(0, 10, 0, 1, 10), (10, 5, 0, 1, 5)]),
        # fewer shards than ranks: ceil(5 / 2) = 3 strided parts of each
        (
            [7, 5],
            5,
            [(0, 7, 0, 3, 3), (0, 7, 1, 3, 2), (0, 7, 2, 3, 2)]
            + [(7, 5, 0, 3, 2), (7, 5, 1, 3, 2), (7, 5, 2, 3, 1)],
        ),
        ([2], 3, [(0, 2, 0, 3, 1), (0, 2, 1, 3, 1)]),  # an empty part is left out
    ],
)
def test_pieces(counts, world_size, expected) -> None:
    urls = [f"s{i}" for i in range(len(counts))]
    first = [sum(counts[:i]) for i in range(len(counts))]
    got = pieces(urls, first, counts, world_size)
    assert [(p.first_idx, p.shard_count, p.part, p.nparts, p.count) for p in got] == expected
    assert [p.url for p in got] == [urls[first.index(e[0])] for e in expected]
    assert sum(p.count for p in got) == sum(counts)


def _piece(count: int, name: str = "") -> Piece:
    return Piece(name or f"s{count}", 0, count, 0, 1, count)


def test_rank_pieces_follow_assign_shards() -> None:
    all_pieces = [_piece(c, f"s{i}") for i, c in enumerate([5, 300, 7, 80, 1, 64])]
    for rank, expected in enumerate([[1], [2, 0, 4, 5, 3]]):
        got = rank_pieces(all_pieces, rank, 2, 3, 1)
        assert got == [all_pieces[i] for i in expected]


@pytest.mark.parametrize(
    "counts,num_workers,expected",
    [
        ([10, 20, 30], 0, [[10, 20, 30]]),  # no workers: one role in the main process
        ([10, 20, 30], 2, [[10, 30], [20]]),
        ([10, 20, 30], 5, [[10], [20], [30]]),  # never more roles than pieces
        ([], 3, [[]]),  # an empty rank (label pass): one empty role
    ],
)
def test_worker_roles(counts, num_workers, expected) -> None:
    roles = worker_roles([_piece(c) for c in counts], num_workers)
    assert [[p.count for p in r] for r in roles] == expected


@pytest.mark.parametrize(
    "steps,loads,batch_size,expected",
    [
        (10, [50, 50], 5, [5, 5]),
        (3, [10, 20], 1, [1, 2]),  # exact proportions
        (5, [10, 10, 10], 2, [2, 2, 1]),  # the spare steps: ties to the lowest worker
        (4, [1, 100], 10, [0, 4]),  # the spare step to the worker with unused samples
        (7, [30, 30, 41], 8, [2, 2, 3]),
        (1, [5], 3, [1]),
    ],
)
def test_split_steps(steps, loads, batch_size, expected) -> None:
    got = split_steps(steps, loads, batch_size)
    assert got == expected and sum(got) == steps


@pytest.mark.parametrize(
    "steps,expected",
    [
        ([2, 1, 3], [0, 1, 2, 0, 2, 2]),  # one batch from each worker in turn, done ones skipped
        ([1, 1], [0, 1]),
        ([0, 2], [1, 1]),
        ([3], [0, 0, 0]),
        ([], []),
    ],
)
def test_worker_order(steps, expected) -> None:
    assert worker_order(steps) == expected


@pytest.mark.parametrize(
    "skip,skips,rotate",
    [
        (0, [0, 0, 0], 0),
        (1, [1, 0, 0], 1),
        (2, [1, 1, 0], 2),
        (3, [1, 1, 1], 0),
        (4, [2, 1, 1], 2),
        (5, [2, 1, 2], 2),
        (6, [2, 1, 3], 0),  # the whole epoch skipped: nothing left to read
    ],
)
def test_resume_point(skip, skips, rotate) -> None:
    assert resume_point(worker_order([2, 1, 3]), skip, 3) == (skips, rotate)


@pytest.mark.parametrize("steps", [[2, 1, 3], [4, 4], [1, 3, 3, 2], [5], [3, 0, 2]])
def test_resumed_round_robin_continues_the_epoch(steps) -> None:
    """After a resume at batch ``s``, worker ``k`` plays role ``(k + rotate) % n`` with the
    batches its role has left; the DataLoader's round-robin over those workers then yields
    exactly the roles of batches ``s, s + 1, ...`` of the uninterrupted epoch."""
    n, order = len(steps), worker_order(steps)
    for skip in range(len(order) + 1):
        skips, rotate = resume_point(order, skip, n)
        role_of = [(k + rotate) % n for k in range(n)]
        left = [steps[role_of[k]] - skips[role_of[k]] for k in range(n)]
        assert [role_of[k] for k in worker_order(left)] == order[skip:]
