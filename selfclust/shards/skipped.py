"""The files a write of ``selfclust shard`` left out: ``OUT/skipped.txt``.

An image folder or file list may hold files that cannot be sharded (gone, empty, truncated,
not an image, a decompression bomb). Unless the write is strict they are skipped: the kept
samples still get idx 0..N-1 in source order, the manifest counts the skipped files
(``"skipped"``), and ``skipped.txt`` names them, one line per file in source order::

    PATH<TAB>REASON

PATH is the file's path as the source names it (a path with a tab or a newline in it would
break the line; such names are not escaped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SKIPPED = "skipped.txt"
_SHOWN = 3  # reasons quoted in the error when nothing was readable


@dataclass(frozen=True)
class Skipped:
    """A source file left out of the shards: its path as the source names it, and why."""

    path: str
    reason: str


def write_skip_list(path: Path, skipped: list[Skipped]) -> None:
    """``skipped`` as ``path<TAB>reason`` lines, flushed to disk (it moves into place with the
    shards). Undecodable bytes of a file name are written back as they were."""
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        f.writelines(f"{s.path}\t{s.reason}\n" for s in skipped)
        f.flush()
        os.fsync(f.fileno())


def nothing_readable(source: str, skipped: list[Skipped]) -> ValueError:
    """The error for a source that gave no sample, every file skipped (or none there): no OUT
    is written, so the first few files and reasons go into the message."""
    if not skipped:
        return ValueError(f"source {source} holds no images")
    shown = "; ".join(f"{s.path} ({s.reason})" for s in skipped[:_SHOWN])
    more = f"; and {len(skipped) - _SHOWN} more" if len(skipped) > _SHOWN else ""
    return ValueError(
        f"source {source} holds no readable images; {len(skipped)} skipped: {shown}{more}"
    )
