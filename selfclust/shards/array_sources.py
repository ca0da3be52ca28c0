"""SOURCE readers of array formats: an ``.npz`` file with ``x``/``y``, and MNIST's IDX files.

Both are read into memory whole and checked by :func:`~selfclust.shards.source.check_arrays`.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from selfclust.shards.source import Source, array_source, check_arrays


def _parse_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) holding unsigned bytes."""
    opener: Any = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"IDX file {path} is truncated: header says {dims}, got {body.size} bytes")
    return body.reshape(dims)


def npz_source(path: Path) -> Source:
    """``x`` (uint8 images) and optionally ``y`` (class ids, negative: unknown) of an .npz."""
    try:
        with np.load(path, allow_pickle=False) as d:
            if "x" not in d.files:
                raise ValueError(
                    f"{path}: an .npz source needs an array 'x' of uint8 images "
                    f"(and optionally labels 'y'); it holds {sorted(d.files)}"
                )
            x, y = d["x"], d["y"] if "y" in d.files else None
    except (OSError, EOFError) as e:  # np.load raises these for a corrupt file
        raise ValueError(f"cannot read {path} as an .npz file: {e}") from e
    x, y = check_arrays(x, y, str(path))
    return array_source(x, y, f"npz:{path}", {"kind": "npz", "path": str(path)})


def idx_source(images: Path, description: str | None = None) -> Source:
    """An IDX images file; the labels file beside it (``labels-idx1`` for ``images-idx3``),
    if there is one, gives the classes."""
    x = _parse_idx(images)
    name = images.name
    label_name = name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
    labels = images.with_name(label_name)
    y = _parse_idx(labels) if label_name != name and labels.is_file() else None
    x, y = check_arrays(x, y, str(images))
    info = {"kind": "idx", "path": str(images), "labels": str(labels) if y is not None else None}
    return array_source(x, y, description or f"idx:{images}", info)


def idx_dir_source(root: Path, description: str | None = None) -> Source:
    """The one IDX images file in directory ``root`` (see :func:`idx_source`)."""
    found = sorted(p for p in root.iterdir() if p.is_file() and "idx3-ubyte" in p.name)
    if len(found) != 1:
        names = [p.name for p in found]
        raise ValueError(
            f"{root} must hold exactly one IDX images file (*idx3-ubyte[.gz]), found {names}; "
            "pass the images file itself as SOURCE"
        )
    return idx_source(found[0], description)
