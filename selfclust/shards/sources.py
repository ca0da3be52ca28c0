"""Which reader a SOURCE of ``selfclust shard`` goes to, and the built-in data sets.

:func:`resolve_source` tells the kinds apart and hands the SOURCE to its reader:
:mod:`~selfclust.shards.array_sources` (``.npz``, IDX), :mod:`~selfclust.shards.file_sources`
(image folder, file list) or :mod:`~selfclust.shards.torchvision_source`. Every reader returns
a :class:`~selfclust.shards.source.Source`.
"""

from __future__ import annotations

import os
from pathlib import Path

from selfclust.shards.array_sources import idx_dir_source, idx_source, npz_source
from selfclust.shards.file_sources import folder_source, list_source
from selfclust.shards.source import Source
from selfclust.shards.torchvision_source import torchvision_source

BUILTIN = {"mnist_test": Path(__file__).parents[1] / "datasets" / "mnist_test"}
LIST_SUFFIXES = (".txt", ".csv", ".tsv", ".lst")
_KINDS = (
    "an .npz file with x/y, an IDX images file (*idx3-ubyte[.gz]) or a directory holding one, "
    "an image-folder directory, a file list (.txt/.csv: path[,label] per line), "
    "torchvision:NAME[:SPLIT] (with root=) or a built-in name"
)


def resolve_source(source: str | os.PathLike, root: str | os.PathLike | None = None) -> Source:
    """Work out what kind of SOURCE ``source`` is."""
    text = str(source)
    if text.startswith("torchvision:"):
        return torchvision_source(text, root)
    path = Path(source)
    if text in BUILTIN and not path.exists():
        src = idx_dir_source(BUILTIN[text], f"builtin:{text}")
        src.info = {"kind": "builtin", "name": text}
        return src
    if not path.exists():
        raise FileNotFoundError(
            f"source {text} does not exist; give {_KINDS} ({', '.join(BUILTIN)})"
        )
    path = path.resolve()
    if path.is_file() and path.suffix == ".npz":
        return npz_source(path)
    if path.is_file() and "idx3-ubyte" in path.name:
        return idx_source(path)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return list_source(path)
    if path.is_dir():
        if any(p.is_file() and "idx3-ubyte" in p.name for p in path.iterdir()):
            return idx_dir_source(path)
        return folder_source(path)
    raise ValueError(f"unknown source kind: {path}; expected {_KINDS} ({', '.join(BUILTIN)})")
