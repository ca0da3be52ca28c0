"""Read selfclust shards: deterministic shard-to-rank assignment and equal-length epochs.

Every rank computes the same assignment from the manifest alone (no communication):

* The unit of assignment is a *piece*: normally one shard. When a set has fewer shards than
  ranks, every shard is split into ``ceil(world_size / num_shards)`` pieces (piece ``j`` of
  ``p`` keeps the shard's samples at positions ``j, j + p, ...``), so no rank is left empty.
* :func:`assign_shards` orders the pieces (fixed order for the label pass, a ``(seed, epoch)``
  permutation for training) and deals each to the rank with the fewest samples so far.
* Within a rank, pieces are dealt to loader workers the same way, and the epoch's
  ``steps_per_epoch`` batches are split between workers in proportion to their samples.
  A worker whose pieces hold fewer samples than its batches need reads them again
  (re-permuted); one with more drops the surplus. So every rank yields exactly the same
  number of batches and DDP never waits on a rank that ran dry.

Samples carry their global ``idx``; batches are ``(images uint8 [B,C,H,W], idx int64 [B])``.
"""

from __future__ import annotations

import heapq
import io
import itertools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from selfclust.shards import _is_url, load_manifest

_META = frozenset({"idx", "cls"})


@dataclass
class ShardSet:
    """A shard directory (or http(s) URL base) opened through its manifest."""

    root: str
    manifest: dict
    urls: list[str]
    counts: list[int]
    num_samples: int
    classes: list[str] | None
    image: dict | None

    @property
    def channels(self) -> int:
        """Channels every image is decoded to: 1 (grayscale) or 3 (RGB)."""
        return int(self.image["channels"] if self.image else self.manifest["channels"])

    @classmethod
    def open(cls, path: str | os.PathLike) -> ShardSet:
        """Open a local shard directory or an http(s) URL base; validates the manifest."""
        path = str(path)
        manifest = load_manifest(path)
        if _is_url(path):
            root = path.rstrip("/")
            urls = [f"{root}/{s['name']}" for s in manifest["shards"]]
        else:
            root = str(Path(path).resolve())
            urls = [str(Path(root) / s["name"]) for s in manifest["shards"]]
        return cls(
            root=root,
            manifest=manifest,
            urls=urls,
            counts=[int(s["count"]) for s in manifest["shards"]],
            num_samples=int(manifest["num_samples"]),
            classes=manifest.get("classes"),
            image=manifest.get("image"),
        )


def _deal(counts: list[int], order: list[int], bins: int) -> list[list[int]]:
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
    return _deal(list(counts), order, world_size)


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
class _Piece:
    url: str
    part: int  # keeps the shard's samples at positions part, part + nparts, ...
    nparts: int
    count: int


def _pieces(shards: ShardSet, world_size: int) -> list[_Piece]:
    nparts = -(-world_size // len(shards.urls))  # ceil: at least one piece per rank
    pieces = [
        _Piece(url, j, nparts, len(range(j, count, nparts)))
        for url, count in zip(shards.urls, shards.counts, strict=True)
        for j in range(nparts)
    ]
    return [p for p in pieces if p.count > 0]


def _read(piece: _Piece) -> Iterator[dict]:
    samples = wds.tarfile_samples([{"url": piece.url}])
    if piece.nparts == 1:
        yield from samples
    else:
        yield from itertools.islice(samples, piece.part, None, piece.nparts)


def _decode(sample: dict, channels: int, image_size: int | None) -> tuple[np.ndarray, int, int]:
    """One sample → (image uint8 [H,W,C], idx, cls or -1)."""
    fields = [k for k in sample if not k.startswith("__") and k not in _META]
    if len(fields) != 1:
        raise ValueError(
            f"sample {sample['__key__']} in {sample.get('__url__')} has image "
            f"fields {fields}; expected exactly one"
        )
    with Image.open(io.BytesIO(sample[fields[0]])) as f:
        im: Image.Image = f
        target = "L" if channels == 1 else "RGB"  # every image of a set gets the same channels
        if im.mode != target:
            im = im.convert(target)
        if image_size is not None and im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
        arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    idx = int(sample["idx"]) if "idx" in sample else int(sample["__key__"])
    cls = int(sample["cls"]) if "cls" in sample else -1
    return arr, idx, cls


def _collate(decoded: list[tuple[np.ndarray, int, int]]) -> tuple[torch.Tensor, ...]:
    arrays = [d[0] for d in decoded]
    if any(a.shape != arrays[0].shape for a in arrays):
        shapes = sorted({a.shape for a in arrays})
        raise ValueError(
            f"images of different sizes in one batch ({shapes[:3]}); "
            "pass image_size to resize them to a common size"
        )
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    idx = torch.tensor([d[1] for d in decoded], dtype=torch.int64)
    cls = torch.tensor([d[2] for d in decoded], dtype=torch.int64)
    return images, idx, cls


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def _split_steps(steps: int, loads: list[int], batch_size: int) -> list[int]:
    """Split ``steps`` between workers in proportion to their samples ``loads``: floors
    first, then one more step each to the workers with the most unused samples, which keeps
    refills (repeated samples) to at most ``(workers - 1) * batch_size`` per rank."""
    total = sum(loads)
    share = [steps * n // total for n in loads]
    spare = sorted(range(len(loads)), key=lambda q: (share[q] * batch_size - loads[q], q))
    for q in spare[: steps - sum(share)]:
        share[q] += 1
    return share


def _worker_order(steps: list[int]) -> list[int]:
    """Which worker produces each batch: DataLoader takes one batch from each worker in turn,
    skipping workers that are done."""
    return [q for r in range(max(steps, default=0)) for q in range(len(steps)) if steps[q] > r]


class _TrainStream(IterableDataset):
    """Batches of one rank; loader worker ``k`` plays role ``(k + rotate) % roles``."""

    def __init__(
        self, roles, steps, skips, rotate, batch_size, key, shuffle_buffer, channels, image_size
    ):
        self.roles, self.steps, self.skips, self.rotate = roles, steps, skips, rotate
        self.batch_size, self.key, self.shuffle_buffer = batch_size, key, shuffle_buffer
        self.channels, self.image_size = channels, image_size

    def _samples(self, role: int) -> Iterator[dict]:
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
            one_pass = (s for i in order for s in _read(pieces[i]))
            if self.shuffle_buffer > 1:
                size = self.shuffle_buffer
                one_pass = wds.filters._shuffle(one_pass, size, size, rng)
            yield from one_pass

    def __iter__(self):
        info = get_worker_info()
        role = ((info.id if info else 0) + self.rotate) % len(self.roles)
        stream = self._samples(role)
        b = self.batch_size
        stream = itertools.islice(stream, self.skips[role] * b, self.steps[role] * b)
        for _ in range(self.steps[role] - self.skips[role]):
            batch = [
                _decode(s, self.channels, self.image_size) for s in itertools.islice(stream, b)
            ]
            images, idx, _ = _collate(batch)
            yield images, idx, role


def _loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False)


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
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One training epoch of this rank: exactly ``steps_per_epoch(...) - skip_steps`` batches
    ``(images uint8 [B,C,H,W], idx int64 [B])`` on every rank.

    The sequence is a pure function of (shard set, rank, world_size, batch_size, seed, epoch,
    num_workers, shuffle_buffer); ``skip_steps=s`` yields its tail from batch ``s`` on without
    decoding the skipped batches (mid-epoch resume).
    """
    _check_rank(rank, world_size, batch_size)
    if seed < 0 or epoch < 0 or shuffle_buffer < 0:
        raise ValueError(
            f"seed, epoch and shuffle_buffer must be >= 0, got {seed}, {epoch}, {shuffle_buffer}"
        )
    steps = steps_per_epoch(shards.num_samples, world_size, batch_size)
    if not 0 <= skip_steps <= steps:
        raise ValueError(f"skip_steps must be in [0, {steps}], got {skip_steps}")
    pieces = _pieces(shards, world_size)
    mine = [
        pieces[i] for i in assign_shards([p.count for p in pieces], world_size, seed, epoch)[rank]
    ]
    if not mine:
        raise ValueError(
            f"rank {rank} has no samples: {shards.num_samples} samples in {len(shards.urls)} "
            f"shards cannot feed {world_size} ranks; shard again with a smaller shard_size"
        )
    n_roles = max(1, min(num_workers, len(mine)))
    deal = _deal([p.count for p in mine], list(range(len(mine))), n_roles)
    roles = [[mine[i] for i in d] for d in deal]
    role_steps = _split_steps(steps, [sum(p.count for p in r) for r in roles], batch_size)
    order = _worker_order(role_steps)
    skips = [order[:skip_steps].count(q) for q in range(n_roles)]
    rotate = order[skip_steps] if skip_steps < steps else 0
    key = (seed, epoch, rank, world_size, n_roles)
    dataset = _TrainStream(
        roles,
        role_steps,
        skips,
        rotate,
        batch_size,
        key,
        shuffle_buffer,
        shards.channels,
        image_size,
    )
    loader = _loader(dataset, n_roles if num_workers > 0 else 0)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        expected = iter(order[skip_steps:])
        for images, idx, role in loader:
            # The resume arithmetic above relies on DataLoader's round-robin over workers.
            if role != next(expected, None):
                raise RuntimeError("DataLoader returned worker batches out of round-robin order")
            yield images, idx
        if next(expected, None) is not None:
            raise RuntimeError("a loader worker stopped early: fewer batches than planned")

    return batches()


class _EvalStream(IterableDataset):
    def __init__(self, roles, batch_size, channels, image_size):
        self.roles, self.batch_size = roles, batch_size
        self.channels, self.image_size = channels, image_size

    def __iter__(self):
        info = get_worker_info()
        stream = (s for p in self.roles[info.id if info else 0] for s in _read(p))
        while batch := [
            _decode(s, self.channels, self.image_size)
            for s in itertools.islice(stream, self.batch_size)
        ]:
            yield _collate(batch)


def eval_batches(
    shards: ShardSet,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int = 0,
    image_size: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every sample of this rank's shards once, unshuffled: ``(images uint8 [b,C,H,W],
    idx int64 [b], cls int64 [b] with -1 where unknown)``. Only the last batch may be short.
    Over all ranks every idx in 0..N-1 appears exactly once."""
    _check_rank(rank, world_size, batch_size)
    pieces = _pieces(shards, world_size)
    mine = [pieces[i] for i in assign_shards([p.count for p in pieces], world_size, 0, None)[rank]]
    n_roles = max(1, min(num_workers, len(mine)))
    deal = _deal([p.count for p in mine], list(range(len(mine))), n_roles)
    dataset = _EvalStream(
        [[mine[i] for i in d] for d in deal], batch_size, shards.channels, image_size
    )
    loader = _loader(dataset, n_roles if num_workers > 0 and mine else 0)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if not mine:
            return
        if n_roles == 1:
            yield from loader
            return
        # Each worker's last batch may be short: re-cut so that only the final one is.
        held: list[tuple[torch.Tensor, ...]] = []
        size = 0
        for batch in loader:
            held.append(batch)
            size += len(batch[1])
            while size >= batch_size:
                cat = [torch.cat(t) for t in zip(*held, strict=True)]
                yield tuple(t[:batch_size] for t in cat)  # type: ignore[misc]
                held = [tuple(t[batch_size:] for t in cat)]
                size -= batch_size
        if size:
            yield tuple(torch.cat(t) for t in zip(*held, strict=True))  # type: ignore[misc]

    return batches()
