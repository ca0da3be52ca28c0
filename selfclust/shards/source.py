"""The :class:`Source` record every SOURCE reader returns, and the two shapes readers build.

A source is sized up front and read by index, not iterated: parallel writer processes
(:func:`~selfclust.shards.encode.encode_parallel`) then encode any range of it, and idx is the
position in source order. Readers of array formats build it with :func:`array_source`, readers
of image files with :func:`files_source`. A file that cannot be read or decoded raises
:class:`UnreadableFile`, which the writer skips and lists (or, when strict, lets through).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class UnreadableFile(ValueError):
    """A source file that cannot be sharded: ``path`` as the source names it and ``reason``
    (one line, the same in every process: it goes into ``skipped.txt``)."""

    def __init__(self, path: str, reason: str, message: str | None = None) -> None:
        super().__init__(
            message
            or f"unreadable image file {path}: {reason}; remove or replace it and shard again "
            "(or shard without --strict to skip and list such files)"
        )
        self.path, self.reason = path, reason

    def __reduce__(self) -> tuple:  # raised in a writer process, re-raised in the parent
        return type(self), (self.path, self.reason, str(self))


@dataclass
class Source:
    """A resolved SOURCE. ``item(i)`` → (("bytes", ext, data) | ("array", a) | ("pil", im), cls)."""

    description: str
    info: dict[str, Any]  # kind, path and options: recorded in the manifest
    num_samples: int
    classes: list[str] | None
    item: Callable[[int], tuple[tuple, int | None]]


def check_arrays(x: Any, y: Any, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` as uint8 images [N, H, W] or [N, H, W, 3] (a channel axis of 1 is dropped) and
    ``y`` as int64 class ids [N] or None; errors name ``where`` and say what to fix."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(
            f"{where}: x must be uint8 images, got dtype {x.dtype}; "
            "scale to 0..255 and cast with x.astype(np.uint8)"
        )
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
        raise ValueError(
            f"{where}: x must have shape (N, H, W) or (N, H, W, C) with C in (1, 3), got {x.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{where}: the dataset is empty (x has 0 images)")
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[..., 0]
    if y is None:
        return x, None
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{where}: y must have one label per image: x has {x.shape[0]} images, "
            f"y has shape {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: y must hold integer class ids, got dtype {y.dtype}")
    return x, y.astype(np.int64)


def array_source(x: np.ndarray, y: np.ndarray | None, description: str, info: dict) -> Source:
    """A source over in-memory images ``x`` (as :func:`check_arrays` returns them), items
    ``("array", x[i])``; no class names."""

    def item(i: int) -> tuple[tuple, int | None]:
        # A negative label means "unknown" for that sample: no cls field.
        cls = None if y is None or y[i] < 0 else int(y[i])
        return ("array", x[i]), cls

    return Source(description, info, int(x.shape[0]), None, item)


def files_source(
    files: list[tuple[Path, int | None]],
    classes: list[str] | None,
    description: str,
    info: dict,
    listed_at: list[str] | None = None,
) -> Source:
    """A source over image files ``(path, class id or None)``, items ``("bytes", ext, data,
    path)``: the file's bytes, read when the item is. A file that is gone or cannot be read
    raises :class:`UnreadableFile`, naming ``listed_at[i]`` (e.g. ``list.txt:12``) if given."""

    def item(i: int) -> tuple[tuple, int | None]:
        path, cls = files[i]
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            at = listed_at[i] if listed_at else None
            message = f"{at}: image file {path} does not exist" if at else None
            raise UnreadableFile(str(path), "file does not exist", message) from e
        except OSError as e:
            raise UnreadableFile(str(path), f"cannot read the file: {e.strerror or e}") from e
        return ("bytes", path.suffix.lower().lstrip("."), data, str(path)), cls

    return Source(description, info, len(files), classes, item)
