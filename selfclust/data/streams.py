"""Read selfclust shards per rank: train and label-pass batches as DataLoader streams.

Which samples each rank and loader worker reads is :mod:`selfclust.data.plan`'s. Here the
plan is read: loader workers decode (and in the loader-augmentation path crop) their samples
and send batches, each with the worker's running :class:`~selfclust.data.reader.DataStats`.

Bad data never changes the number of batches: an unreadable shard is skipped (the worker reads
its other pieces again), and in training a corrupt image's slot is filled with another sample
of the same batch. Both are counted in the iterators' :class:`~selfclust.data.reader.DataStats`.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from selfclust.config import AugmentConfig
from selfclust.data import plan
from selfclust.data.augment import LoaderAugment
from selfclust.data.collate import Decoder
from selfclust.data.reader import DataStats, read_shard
from selfclust.data.shardset import ShardSet

log = logging.getLogger("selfclust.data")
T = TypeVar("T")


def wds_shuffle(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """``samples`` through a shuffle buffer of ``size`` (filled to ``size`` before the first
    sample comes out), drawing from ``rng``. This is webdataset's private
    ``wds.filters._shuffle``, pinned as ``webdataset==1.0.*`` in pyproject.toml and checked by
    tests/data/test_wds_private.py; a buffer of our own would change every shuffled stream."""
    shuffle = getattr(wds.filters, "_shuffle", None)
    if shuffle is None:
        raise ImportError(
            f"webdataset {getattr(wds, '__version__', '?')} has no wds.filters._shuffle; "
            "selfclust needs webdataset==1.0.* (pyproject.toml)"
        )
    return shuffle(samples, size, size, rng)


def _shard_pieces(shards: ShardSet, world_size: int) -> list[plan.Piece]:
    assert shards.first_idx is not None
    return plan.pieces(shards.urls, shards.first_idx, shards.counts, world_size)


def _read(piece: plan.Piece, stats: DataStats, timeout_s: float) -> Iterator[dict]:
    return read_shard(
        piece.url, stats, piece.first_idx, piece.shard_count, piece.part, piece.nparts, timeout_s
    )


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


class Batches(Generic[T]):
    """An epoch's batches (iterate once) plus ``stats``: the bad data met so far, summed over
    this rank's loader workers (each worker sends its running counts with every batch)."""

    def __init__(self, messages: Iterator[tuple[Any, int, DataStats | None]], unpack: Callable):
        self._messages, self._unpack = messages, unpack
        self._per_worker: dict[int, DataStats] = {}
        self._gen = self._run()

    @property
    def stats(self) -> DataStats:
        total = DataStats()
        for s in self._per_worker.values():
            total.add(s)
        return total

    def _run(self) -> Iterator[T]:
        for payload, role, stats in self._messages:
            if stats is not None:
                old = self._per_worker.get(role, DataStats()).bad_shards
                for url in sorted(set(stats.bad_shards) - set(old)):
                    log.warning("skipped the rest of shard %s: %s", url, stats.bad_shards[url])
                self._per_worker[role] = stats
            if payload is not None:
                yield self._unpack(payload, role)

    def __iter__(self) -> Batches[T]:
        return self

    def __next__(self) -> T:
        return next(self._gen)


class _TrainStream(IterableDataset):
    """Batches of one rank; loader worker ``k`` plays role ``(k + rotate) % roles``."""

    def __init__(
        self, roles, steps, skips, rotate, batch_size, key, shuffle_buffer, decoder, timeout_s
    ):
        self.roles, self.steps, self.skips, self.rotate = roles, steps, skips, rotate
        self.batch_size, self.key, self.shuffle_buffer = batch_size, key, shuffle_buffer
        self.decoder, self.timeout_s = decoder, timeout_s

    def _samples(self, role: int, stats: DataStats) -> Iterator[dict]:
        """The worker's samples, pass after pass. Each pass is shuffled on its own, so pass 0
        yields every sample once before any repeats (a buffer larger than a worker's share
        must not pull the refill pass forward)."""
        pieces = self.roles[role]
        rng = random.Random(_seed(*self.key, role))
        for cycle in itertools.count():
            order = list(range(len(pieces)))
            if cycle > 0:  # refill a short worker: the same pieces again, freshly permuted
                rng_pass = np.random.default_rng(_seed(*self.key, role, cycle))
                order = rng_pass.permutation(len(pieces)).tolist()
            got = 0
            one_pass: Iterator[dict] = (
                s for i in order for s in _read(pieces[i], stats, self.timeout_s)
            )
            if self.shuffle_buffer > 1:
                one_pass = wds_shuffle(one_pass, self.shuffle_buffer, rng)
            for sample in one_pass:
                got += 1
                yield sample
            if got == 0:  # every piece unreadable: fail instead of looping forever
                raise RuntimeError(
                    "no shard of this loader worker could be read: "
                    f"{sorted(stats.bad_shards.items())[:3]}"
                )

    def __iter__(self):
        info = get_worker_info()
        role = ((info.id if info else 0) + self.rotate) % len(self.roles)
        stats = DataStats()
        stream = self._samples(role, stats)
        b = self.batch_size
        stream = itertools.islice(stream, self.skips[role] * b, self.steps[role] * b)
        last_good: tuple | None = None
        for _ in range(self.steps[role] - self.skips[role]):
            raw = list(itertools.islice(stream, b))
            items = [self.decoder.one(s) for s in raw]
            good = [it for it in items if it is not None]
            stats.corrupt_images += len(items) - len(good)
            if not good:
                if last_good is None:
                    raise RuntimeError(
                        f"none of the {b} images of a batch decoded "
                        f"(from {raw[0].get('__url__')}); "
                        "check the shards with `selfclust shard --verify --decode`"
                    )
                good = [last_good]
            last_good = good[-1]
            # A corrupt image's slot takes the next good sample of the batch: the batch keeps
            # its size and its position in the epoch, so skip_steps stays exact.
            filled = [it if it is not None else good[k % len(good)] for k, it in enumerate(items)]
            images, idx, _ = self.decoder.batch(filled)
            yield (images, idx), role, stats.copy()


def _loader(dataset: IterableDataset, num_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=pin_memory,
    )


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def train_batches(
    shards: ShardSet,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    epoch: int,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    skip_steps: int = 0,
    image_size: int | None = None,
    loader_augment: AugmentConfig | None = None,
    pin_memory: bool = False,
) -> Batches[tuple[torch.Tensor, torch.Tensor]]:
    """One training epoch of this rank: exactly ``steps_per_epoch(...) - skip_steps`` batches
    ``(images uint8 [B,C,H,W], idx int64 [B])`` on every rank.

    The sequence is a pure function of (shard set, rank, world_size, batch_size, seed, epoch,
    num_workers, shuffle_buffer); ``skip_steps=s`` yields its tail from batch ``s`` on without
    decoding the skipped batches (mid-epoch resume).

    ``loader_augment``: augment in the loader workers instead (see
    :class:`~selfclust.data.augment.LoaderAugment`); images are then the augmented uint8 crops of
    size ``image_size`` (default: the manifest's uniform size). The returned :class:`Batches`
    carries the bad-data counts in ``.stats``.
    """
    _check_rank(rank, world_size, batch_size)
    if seed < 0 or epoch < 0 or shuffle_buffer < 0:
        raise ValueError(
            f"seed, epoch and shuffle_buffer must be >= 0, got {seed}, {epoch}, {shuffle_buffer}"
        )
    steps = plan.steps_per_epoch(shards.num_samples, world_size, batch_size)
    if not 0 <= skip_steps <= steps:
        raise ValueError(f"skip_steps must be in [0, {steps}], got {skip_steps}")
    aug = None
    if loader_augment is not None:
        size = image_size
        if size is None and shards.image and shards.image["height"] == shards.image["width"]:
            size = int(shards.image["height"])
        if size is None:
            raise ValueError(
                "loader augmentation needs an output size: set data.image_size "
                "(the images of this shard set are not all the same square size)"
            )
        aug = LoaderAugment(loader_augment, seed, epoch, size, shards.channels)
    mine = plan.rank_pieces(_shard_pieces(shards, world_size), rank, world_size, seed, epoch)
    if not mine:
        raise ValueError(
            f"rank {rank} has no samples: {shards.num_samples} samples in {len(shards.urls)} "
            f"shards cannot feed {world_size} ranks; shard again with a smaller shard_size"
        )
    roles = plan.worker_roles(mine, num_workers)
    n_roles = len(roles)
    role_steps = plan.split_steps(steps, [sum(p.count for p in r) for r in roles], batch_size)
    order = plan.worker_order(role_steps)
    skips, rotate = plan.resume_point(order, skip_steps, n_roles)
    key = (seed, epoch, rank, world_size, n_roles)
    decoder = Decoder(shards.channels, image_size, aug)
    dataset = _TrainStream(
        roles, role_steps, skips, rotate, batch_size, key, shuffle_buffer, decoder, shards.timeout_s
    )
    loader = _loader(dataset, n_roles if num_workers > 0 else 0, pin_memory)
    expected = iter(order[skip_steps:])

    def unpack(payload: tuple[torch.Tensor, torch.Tensor], role: int):
        # The resume arithmetic (selfclust.data.plan) relies on DataLoader's round-robin.
        if role != next(expected, None):
            raise RuntimeError("DataLoader returned worker batches out of round-robin order")
        return payload

    def messages():
        yield from loader
        if next(expected, None) is not None:
            raise RuntimeError("a loader worker stopped early: fewer batches than planned")

    return Batches(messages(), unpack)


class _EvalStream(IterableDataset):
    def __init__(self, roles, batch_size, decoder, timeout_s):
        self.roles, self.batch_size = roles, batch_size
        self.decoder, self.timeout_s = decoder, timeout_s

    def __iter__(self):
        info = get_worker_info()
        role = info.id if info else 0
        stats = DataStats()
        stream = (s for p in self.roles[role] for s in _read(p, stats, self.timeout_s))
        items: list[tuple] = []
        for sample in stream:
            item = self.decoder.one(sample)
            if item is None:
                stats.corrupt_images += 1  # left out: the label pass must not see it twice
                continue
            items.append(item)
            if len(items) == self.batch_size:
                yield self.decoder.batch(items), role, stats.copy()
                items = []
        # The last message always carries the final counts, even without a batch.
        yield (self.decoder.batch(items) if items else None), role, stats.copy()


def eval_batches(
    shards: ShardSet,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int = 0,
    image_size: int | None = None,
) -> Batches[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every sample of this rank's shards once, unshuffled: ``(images uint8 [b,C,H,W],
    idx int64 [b], cls int64 [b] with -1 where unknown)``. Only the last batch may be short.
    Over all ranks every idx in 0..N-1 appears exactly once, except bad data, which is left
    out and counted in ``.stats`` (so seen + ``stats.skipped`` over all ranks is N)."""
    _check_rank(rank, world_size, batch_size)
    mine = plan.rank_pieces(_shard_pieces(shards, world_size), rank, world_size, 0, None)
    roles = plan.worker_roles(mine, num_workers)
    decoder = Decoder(shards.channels, image_size, None)
    dataset = _EvalStream(roles, batch_size, decoder, shards.timeout_s)
    loader = _loader(dataset, len(roles) if num_workers > 0 and mine else 0)

    def recut() -> Iterator[tuple[Any, int, DataStats | None]]:
        # Each worker's last batch may be short: re-cut so that only the final one is.
        if not mine:
            return
        held: list[tuple[torch.Tensor, ...]] = []
        size = 0
        for batch, role, stats in loader:
            if batch is None:
                yield None, role, stats
                continue
            held.append(batch)
            size += len(batch[1])
            while size >= batch_size:
                cat = [torch.cat(t) for t in zip(*held, strict=True)]
                yield tuple(t[:batch_size] for t in cat), role, stats
                held = [tuple(t[batch_size:] for t in cat)]
                size -= batch_size
        if size:
            yield tuple(torch.cat(t) for t in zip(*held, strict=True)), 0, None

    return Batches(recut(), lambda payload, role: payload)
