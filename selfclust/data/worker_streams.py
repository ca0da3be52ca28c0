"""What one DataLoader worker of a rank runs: read its pieces, shuffle, decode, batch.

Each worker plays a *role*: a list of :class:`~selfclust.data.plan.Piece` chosen by
:mod:`selfclust.data.plan`. It sends ``(batch, role, stats)`` messages, where ``stats`` is a
copy of its running :class:`~selfclust.data.reader.DataStats`, to the rank's
:class:`~selfclust.data.streams.Batches`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from selfclust.data import plan
from selfclust.data.collate import Decoder
from selfclust.data.reader import DataStats, read_shard
from selfclust.seeds import mix

T = TypeVar("T")


def wds_shuffle(samples: Iterator[T], size: int, rng: random.Random) -> Iterator[T]:
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


def _read(piece: plan.Piece, stats: DataStats, timeout_s: float) -> Iterator[dict]:
    return read_shard(
        piece.url, stats, piece.first_idx, piece.shard_count, piece.part, piece.nparts, timeout_s
    )


class TrainStream(IterableDataset):
    """Batches of one rank; loader worker ``k`` plays role ``(k + rotate) % roles``.

    Role ``r`` yields batches ``skips[r]`` to ``steps[r] - 1`` of its shuffled samples. ``key``
    (seed, epoch, rank, world size, number of roles) and the role seed every random draw.
    """

    def __init__(
        self,
        roles: Sequence[Sequence[plan.Piece]],
        steps: Sequence[int],
        skips: Sequence[int],
        rotate: int,
        batch_size: int,
        key: tuple[int, ...],
        shuffle_buffer: int,
        decoder: Decoder,
        timeout_s: float,
        params: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.roles, self.steps, self.skips, self.rotate = roles, steps, skips, rotate
        self.batch_size, self.key, self.shuffle_buffer = batch_size, key, shuffle_buffer
        self.decoder, self.timeout_s, self.params = decoder, timeout_s, params

    def _samples(self, role: int, stats: DataStats) -> Iterator[dict]:
        """The worker's samples, pass after pass. Each pass is shuffled on its own, so pass 0
        yields every sample once before any repeats (a buffer larger than a worker's share
        must not pull the refill pass forward)."""
        pieces = self.roles[role]
        rng = random.Random(mix(*self.key, role))
        for cycle in itertools.count():
            order = list(range(len(pieces)))
            if cycle > 0:  # refill a short worker: the same pieces again, freshly permuted
                rng_pass = np.random.default_rng(mix(*self.key, role, cycle))
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

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, ...], int, DataStats]]:
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
            if self.params is None:
                yield (images, idx), role, stats.copy()
            else:  # the device augmentation's parameters, drawn here off the step's path
                yield (images, idx, self.params(idx)), role, stats.copy()


class EvalStream(IterableDataset):
    """Every sample of loader worker ``k``'s role ``k`` once, in order, in batches of
    ``batch_size`` (the last one short); the last message carries the final counts."""

    def __init__(
        self,
        roles: Sequence[Sequence[plan.Piece]],
        batch_size: int,
        decoder: Decoder,
        timeout_s: float,
    ):
        self.roles, self.batch_size = roles, batch_size
        self.decoder, self.timeout_s = decoder, timeout_s

    def __iter__(self) -> Iterator[tuple[Any, int, DataStats]]:
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
