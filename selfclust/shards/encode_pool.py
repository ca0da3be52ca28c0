"""The writer processes of ``selfclust shard``: encode every item of a source in parallel.

Items are encoded in ranges of ``chunk`` by a pool of forked processes and come back in source
order, so the shards (and the list of skipped files) do not depend on the number of processes.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator

from selfclust.shards.skipped import Skipped
from selfclust.shards.source import Source, UnreadableFile

_STATE: tuple | None = None  # (source, options, encoder, strict) in a writer process


def _init_worker(state: tuple) -> None:
    global _STATE
    _STATE = state


def _encode_range(bounds: tuple[int, int]) -> list[tuple | Skipped]:
    assert _STATE is not None
    src, opts, fn, strict = _STATE
    out: list[tuple | Skipped] = []
    for i in range(*bounds):
        try:
            raw, cls = src.item(i)
            out.append((*fn(raw, opts), cls))
        except UnreadableFile as e:
            if strict:
                raise
            out.append(Skipped(e.path, e.reason))
    return out


def encode_parallel(
    src: Source,
    opts: dict,
    workers: int,
    fn: Callable[[tuple, dict], tuple],
    chunk: int = 64,
    strict: bool = False,
) -> Iterator[tuple | Skipped]:
    """``fn(raw item, opts) + (cls,)`` for every item in source order, computed by ``workers``
    forked processes (the result does not depend on how many). An item that raises
    :class:`UnreadableFile` comes back as :class:`Skipped`, or with ``strict`` the error stops
    the write."""
    ranges = [(a, min(a + chunk, src.num_samples)) for a in range(0, src.num_samples, chunk)]
    state = (src, opts, fn, strict)
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        _init_worker(state)
        for r in ranges:
            yield from _encode_range(r)
        return
    # fork: the source (arrays, file lists, datasets) is inherited, not pickled.
    with mp.get_context("fork").Pool(workers, _init_worker, (state,)) as pool:
        for part in pool.imap(_encode_range, ranges):
            yield from part
