"""Read selfclust shards per rank: train and label-pass batches as DataLoader streams.

Which samples each rank and loader worker reads is :mod:`selfclust.data.plan`'s. Here the
plan is read: loader workers (:mod:`selfclust.data.worker_streams`) decode (and in the
loader-augmentation path crop) their samples and send batches, each with the worker's running
:class:`~selfclust.data.reader.DataStats`; :class:`Batches` gathers them on the rank.

Bad data never changes the number of batches: an unreadable shard is skipped (the worker reads
its other pieces again), and in training a corrupt image's slot is filled with another sample
of the same batch. Both are counted in the iterators' :class:`~selfclust.data.reader.DataStats`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import DataLoader, IterableDataset

from selfclust.config import AugmentConfig
from selfclust.data import plan
from selfclust.data.augment import LoaderAugment, draw_params
from selfclust.data.collate import Decoder
from selfclust.data.reader import DataStats
from selfclust.data.shardset import ShardSet
from selfclust.data.worker_streams import EvalStream, TrainStream
from selfclust.errors import DataError

log = logging.getLogger("selfclust.data")
T = TypeVar("T")
_Message = tuple[Any, int, DataStats | None]  # (batch or None, role, the role's stats or None)


class Batches(Generic[T]):
    """An epoch's batches (iterate once) plus ``stats``: the bad data met so far, summed over
    this rank's loader workers (each worker sends its running counts with every batch)."""

    def __init__(self, messages: Iterator[_Message], unpack: Callable):
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


def _shard_pieces(shards: ShardSet, world_size: int) -> list[plan.Piece]:
    assert shards.first_idx is not None
    return plan.pieces(shards.urls, shards.first_idx, shards.counts, world_size)


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


def _loader_augment(
    shards: ShardSet, cfg: AugmentConfig, image_size: int | None, seed: int, epoch: int
) -> LoaderAugment:
    """The loader-side augmentation; its crops need one output size, ``image_size`` or else
    the shard set's own if all its images are the same square."""
    size = image_size
    if size is None and shards.image and shards.image["height"] == shards.image["width"]:
        size = int(shards.image["height"])
    if size is None:
        raise DataError(
            "loader augmentation needs an output size: set data.image_size "
            "(the images of this shard set are not all the same square size)"
        )
    return LoaderAugment(cfg, seed, epoch, size, shards.channels)


def _in_planned_order(loader: DataLoader, order: list[int]) -> Batches:
    """``loader``'s batches, checked to come from the workers in the planned ``order`` and to
    be all there: the resume arithmetic (selfclust.data.plan) relies on DataLoader's
    round-robin."""
    expected = iter(order)

    def unpack(payload: tuple[torch.Tensor, torch.Tensor], role: int):
        if role != next(expected, None):
            raise RuntimeError("DataLoader returned worker batches out of round-robin order")
        return payload

    def messages():
        yield from loader
        if next(expected, None) is not None:
            raise RuntimeError("a loader worker stopped early: fewer batches than planned")

    return Batches(messages(), unpack)


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
    device_augment: AugmentConfig | None = None,
) -> Batches[tuple[torch.Tensor, ...]]:
    """One training epoch of this rank: exactly ``steps_per_epoch(...) - skip_steps`` batches
    ``(images uint8 [B,C,H,W], idx int64 [B])`` on every rank.

    The sequence is a pure function of (shard set, rank, world_size, batch_size, seed, epoch,
    num_workers, shuffle_buffer); ``skip_steps=s`` yields its tail from batch ``s`` on without
    decoding the skipped batches (mid-epoch resume).

    ``loader_augment``: augment in the loader workers instead (see
    :class:`~selfclust.data.augment.LoaderAugment`); images are then the augmented uint8 crops of
    size ``image_size`` (default: the manifest's uniform size). The returned :class:`Batches`
    carries the bad-data counts in ``.stats``. ``device_augment``: each batch is
    ``(images, idx, params)``, with the device augmentation's ``draw_params`` of the batch
    drawn by the loader workers (:func:`~selfclust.data.augment.augment` ``params=``).
    """
    _check_rank(rank, world_size, batch_size)
    if seed < 0 or epoch < 0 or shuffle_buffer < 0:
        raise ValueError(
            f"seed, epoch and shuffle_buffer must be >= 0, got {seed}, {epoch}, {shuffle_buffer}"
        )
    steps = plan.steps_per_epoch(shards.num_samples, world_size, batch_size)
    if not 0 <= skip_steps <= steps:
        raise ValueError(f"skip_steps must be in [0, {steps}], got {skip_steps}")
    if loader_augment is not None and device_augment is not None:
        raise ValueError("augment in the loader or on the device, not both")
    aug = None
    if loader_augment is not None:
        aug = _loader_augment(shards, loader_augment, image_size, seed, epoch)
    mine = plan.rank_pieces(_shard_pieces(shards, world_size), rank, world_size, seed, epoch)
    if not mine:
        raise DataError(
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
    params = None if device_augment is None else partial(draw_params, device_augment, seed, epoch)
    dataset = TrainStream(
        roles, role_steps, skips, rotate, batch_size, key, shuffle_buffer, decoder,
        shards.timeout_s, params,
    )  # fmt: skip
    loader = _loader(dataset, n_roles if num_workers > 0 else 0, pin_memory)
    return _in_planned_order(loader, order[skip_steps:])


def _recut(loader: DataLoader, batch_size: int, pin_memory: bool = False) -> Iterator[_Message]:
    """Each worker's last batch may be short: re-cut so that only the final one is. With
    ``pin_memory`` the re-cut batches are written into pinned memory (their copy to the GPU
    is then asynchronous), at no extra copy."""

    def cat(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if not pin_memory:  # torch.cat keeps the inputs' memory format (and so the CPU's bits)
            return torch.cat(tensors)
        first = tensors[0]
        shape = (sum(len(t) for t in tensors), *first.shape[1:])
        return torch.cat(tensors, out=torch.empty(shape, dtype=first.dtype, pin_memory=True))

    held: list[tuple[torch.Tensor, ...]] = []
    size = 0
    for batch, role, stats in loader:
        if batch is None:
            yield None, role, stats
            continue
        held.append(batch)
        size += len(batch[1])
        while size >= batch_size:
            whole = [cat(t) for t in zip(*held, strict=True)]
            yield tuple(t[:batch_size] for t in whole), role, stats
            held = [tuple(t[batch_size:] for t in whole)]
            size -= batch_size
    if size:
        yield tuple(cat(t) for t in zip(*held, strict=True)), 0, None


def eval_batches(
    shards: ShardSet,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int = 0,
    image_size: int | None = None,
    pin_memory: bool = False,
) -> Batches[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every sample of this rank's shards once, unshuffled: ``(images uint8 [b,C,H,W],
    idx int64 [b], cls int64 [b] with -1 where unknown)``. Only the last batch may be short.
    Over all ranks every idx in 0..N-1 appears exactly once, except bad data, which is left
    out and counted in ``.stats`` (so seen + ``stats.skipped`` over all ranks is N).
    ``pin_memory``: batches in pinned memory, for an asynchronous copy to a GPU."""
    _check_rank(rank, world_size, batch_size)
    mine = plan.rank_pieces(_shard_pieces(shards, world_size), rank, world_size, 0, None)
    roles = plan.worker_roles(mine, num_workers)
    decoder = Decoder(shards.channels, image_size, None)
    dataset = EvalStream(roles, batch_size, decoder, shards.timeout_s)
    loader = _loader(dataset, len(roles) if num_workers > 0 and mine else 0)
    messages = _recut(loader, batch_size, pin_memory) if mine else iter(())  # no shards: none
    return Batches(messages, lambda payload, role: payload)
