"""The ``torchvision:NAME[:SPLIT]`` SOURCE: a torchvision dataset already on disk.

selfclust never downloads. The dataset is read the cheapest way it offers: its file list
(``samples``/``imgs``: the files' bytes are kept), its in-memory ``data``/``targets`` arrays,
or else item by item as PIL images.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from selfclust.shards.source import Source, array_source, check_arrays, files_source


def _split_kwargs(spec: str, name: str, split: str | None, params: Mapping) -> dict[str, Any]:
    """The constructor arguments that open SPLIT without downloading: ``split=SPLIT`` or
    ``train=(SPLIT == 'train')``, whichever the dataset class takes."""
    kwargs: dict[str, Any] = {}
    if "download" in params:
        kwargs["download"] = False
    if split is not None:
        if "split" in params:
            kwargs["split"] = split
        elif "train" in params:
            if split not in ("train", "test"):
                raise ValueError(f"{spec}: {name} has splits 'train' and 'test', not {split!r}")
            kwargs["train"] = split == "train"
        else:
            raise ValueError(f"{spec}: {name} takes no split")
    return kwargs


def torchvision_source(spec: str, root: str | os.PathLike | None) -> Source:
    """``torchvision:NAME[:SPLIT]``: a torchvision dataset already on disk under ``root``
    (never downloaded). SPLIT is passed as ``split=`` or as ``train=(SPLIT == 'train')``."""
    import torchvision.datasets as tvd

    _, name, *rest = spec.split(":")
    split = rest[0] if rest else None
    cls = getattr(tvd, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"{spec}: torchvision.datasets has no dataset {name!r}")
    if root is None:
        raise ValueError(f"{spec}: pass root= (--root DIR), the folder the dataset is stored in")
    kwargs = _split_kwargs(spec, name, split, inspect.signature(cls).parameters)
    try:
        ds = cls(str(root), **kwargs)
    except (RuntimeError, OSError, ValueError) as e:
        raise ValueError(
            f"{spec}: cannot open {name} under {root} ({e}); selfclust never downloads: "
            "get the dataset with torchvision first"
        ) from e
    classes = getattr(ds, "classes", None)
    classes = (
        list(classes)
        if isinstance(classes, list) and all(isinstance(c, str) for c in classes)
        else None
    )
    desc = f"torchvision:{name}{':' + split if split else ''}@{Path(root).resolve()}"
    info = {"kind": "torchvision", "name": name, "split": split, "root": str(Path(root).resolve())}
    samples = getattr(ds, "samples", None) or getattr(ds, "imgs", None)
    data, targets = getattr(ds, "data", None), getattr(ds, "targets", None)
    if isinstance(samples, list) and samples and isinstance(samples[0][0], str):
        files: list[tuple[Path, int | None]] = [(Path(p), int(t)) for p, t in samples]  # files
        return files_source(files, classes, desc, info)
    if data is not None and targets is not None and len(data) == len(ds):
        x, y = check_arrays(np.asarray(data), np.asarray(targets), desc)  # in-memory arrays
        src = array_source(x, y, desc, info)
        src.classes = classes
        return src

    def item(i: int) -> tuple[tuple, int | None]:
        im, target = ds[i]
        return ("pil", im), int(target) if isinstance(target, int) else None

    return Source(desc, info, len(ds), classes, item)
