"""The driver's work on the data before any worker starts: built-in sets sharded and paths made
absolute (:func:`resolve_data`), then the checks: every shard of a set is where its manifest
says and of the size it records (:func:`check_sets`), K <= N, batch <= N (:func:`preflight`).

Without it a missing shard is found by every Ray worker at once, each with its traceback, and
Ray Train restarts the group until its attempts are spent; here it is one line naming the shard.
What is checked per shard, within ``timeout_s`` seconds each:

* a local path: one ``stat`` (cheap, so one after the other);
* http(s): a HEAD request, or a GET of one byte where HEAD is refused (:func:`~selfclust.data.
  urls.http_size`), ``threads`` at a time, so that thousands of shards take seconds;
* ``pipe:`` commands: each is started, must yield a first block, and is then killed; a pipe
  tells no size, so only that it yields data (``threads`` commands at a time).

Manifests written before per-shard ``bytes`` were recorded get the existence check only.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfclust.config import RunConfig
from selfclust.data.plan import steps_per_epoch
from selfclust.data.shardset import ShardSet
from selfclust.data.urls import ShardNotFound, http_size, is_local, open_url
from selfclust.errors import DataError

SHOWN = 3  # bad shards an error names; the rest are counted


class BadShards(DataError):
    """Shards of a set that are missing, unreadable, or not the size its manifest records."""


@dataclass(frozen=True)
class _Problem:
    name: str
    kind: str  # "missing", "unreadable" or "size"
    detail: str = ""  # the reader's own words (HTTP status, the command's stderr); "" for a stat
    size: int = 0  # with kind "size": the bytes found, and the manifest's
    expected: int = 0

    def short(self) -> str:
        if self.kind == "size":
            return f"{self.name} is {self.size} bytes, the manifest says {self.expected}"
        return f"{self.name} is {'missing' if self.kind == 'missing' else 'unreadable'}"


def _size(url: str, timeout_s: float) -> int | None:
    """Bytes of the file at ``url``, None where unknown (a pipe, a server that will not tell);
    raises ShardNotFound where it is not there."""
    if url.startswith(("http://", "https://")):
        return http_size(url, timeout_s)
    if url.startswith("pipe:"):
        with open_url(url, timeout_s) as f:  # closing it kills the command's process group
            if not f.read(1):
                raise ShardNotFound(f"{url} not found (the command wrote nothing)")
        return None
    return os.stat(url).st_size


def _check(name: str, url: str, expected: object, timeout_s: float) -> _Problem | bool:
    """The shard's problem, else whether its size was compared with the manifest's."""
    try:
        size = _size(url, timeout_s)
    except FileNotFoundError as e:  # ShardNotFound included
        return _Problem(name, "missing", "" if is_local(url) else str(e))
    except OSError as e:
        return _Problem(name, "unreadable", str(e))
    if size is None or not isinstance(expected, int) or isinstance(expected, bool):
        return False
    if size != expected:
        return _Problem(name, "size", size=size, expected=expected)
    return True


def _message(problems: list[_Problem], root: str, total: int) -> str:
    if len(problems) == 1:
        p = problems[0]
        if p.kind == "size":
            why = (
                "it was cut off while being copied; copy it again"
                if p.size < p.expected
                else "it was changed after it was written; copy it again or shard again"
            )
            return f"{p.name} of {root} is {p.size} bytes, the manifest says {p.expected}: {why}"
        detail = f": {p.detail}" if p.detail else ""
        return (
            f"{p.name} of {root} is {'missing' if p.kind == 'missing' else 'unreadable'} "
            f"(the manifest lists {total} shards){detail}; restore it or shard again"
        )
    named = "; ".join(p.short() for p in problems[:SHOWN])
    more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    first = next((p for p in problems if p.detail), None)
    detail = f" ({first.name}: {first.detail})" if first else ""
    return (
        f"{len(problems)} of the {total} shards of {root} are missing or not the size the "
        f"manifest says: {named}{more}{detail}; restore or copy them again, or shard again"
    )


def check_shards(shards: ShardSet, timeout_s: float | None = None, threads: int = 32) -> int:
    """Check that every shard of ``shards`` exists and, where the manifest records its
    ``bytes`` and the store tells a size (not ``pipe:``), has that size.

    ``timeout_s`` bounds each shard's check (default: the set's own ``timeout_s``, i.e.
    ``data.io_timeout_s``); http(s) and ``pipe:`` shards are checked ``threads`` at a time.
    Raises :class:`BadShards` (a :class:`~selfclust.errors.DataError`, so a ``ValueError``)
    naming the first few bad shards and their count. Returns how many shards had their size
    compared (the others: existence only).
    """
    timeout = shards.timeout_s if timeout_s is None else timeout_s
    entries = shards.manifest["shards"]
    jobs = [
        (e["name"], url, e.get("bytes"), timeout)
        for e, url in zip(entries, shards.urls, strict=True)
    ]
    if all(is_local(url) for url in shards.urls) or threads <= 1:
        results = [_check(*job) for job in jobs]
    else:
        with ThreadPoolExecutor(min(threads, len(jobs)), thread_name_prefix="preflight") as pool:
            results = list(pool.map(lambda job: _check(*job), jobs))
    problems = [r for r in results if isinstance(r, _Problem)]
    if problems:
        raise BadShards(_message(problems, shards.root, len(entries)))
    return sum(r is True for r in results)


def check_sets(cfg: RunConfig) -> ShardSet:
    """Every shard of the training (and evaluation) set there, at its size: one error naming
    a missing one. The driver runs it before anything reads an image (the recipe's sample).
    Returns the opened training set, so its manifest is read once."""
    shards = ShardSet.open(cfg.data.train, cfg.data.io_timeout_s)
    check_shards(shards)
    if cfg.data.eval:
        check_shards(ShardSet.open(cfg.data.eval, cfg.data.io_timeout_s))
    return shards


def preflight(cfg: RunConfig, shards: ShardSet | None = None) -> None:
    """Check what depends on the data's size before any worker starts (after
    :func:`check_sets`; ``shards``: the training set it opened), so errors read plainly."""
    if shards is None:
        shards = ShardSet.open(cfg.data.train, cfg.data.io_timeout_s)
    n, m = shards.num_samples, cfg.method
    if m.clusters > n:
        raise DataError(
            f"method.clusters={m.clusters} exceeds the {n} samples in {cfg.data.train}: "
            "K clusters need at least K samples"
        )
    workers = max(1, cfg.trainer.num_workers)
    steps_per_epoch(n, workers, cfg.optim.batch_size // workers)  # raises if N < batch


def resolve_data(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """A built-in dataset name becomes a shard dir under RUN_DIR/shards (written once); a
    relative local path becomes absolute (from where the command runs: the Ray workers run
    in another directory)."""
    from selfclust.shards.sources import BUILTIN
    from selfclust.shards.write import write_shards

    updates: dict[str, Any] = {}
    for key in ("train", "eval"):
        name = getattr(cfg.data, key)
        if name in BUILTIN and not Path(name).exists():
            out = run_dir / "shards" / name
            if not (out / "manifest.json").is_file():
                write_shards(name, out)
            updates[key] = str(out.resolve())
        elif name and is_local(name) and not os.path.isabs(name):
            updates[key] = os.path.abspath(name)
    if not updates:
        return cfg
    data = cfg.data.model_copy(update=updates)
    return cfg.model_copy(update={"data": data})
