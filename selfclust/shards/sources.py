"""Readers for the SOURCE formats ``selfclust shard`` accepts.

A :class:`Source` knows its size and classes and gives random access to item ``i`` as either
encoded image bytes (files: kept as they are unless re-encoding is asked for), a uint8 array
(``.npz``, IDX) or a PIL image (torchvision datasets), plus its class id or None. Random
access lets parallel writer processes encode any range; idx is the position in source order.
"""

from __future__ import annotations

import csv
import gzip
import inspect
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

BUILTIN = {"mnist_test": Path(__file__).parents[1] / "datasets" / "mnist_test"}
LIST_SUFFIXES = (".txt", ".csv", ".tsv", ".lst")
_KINDS = (
    "an .npz file with x/y, an IDX images file (*idx3-ubyte[.gz]) or a directory holding one, "
    "an image-folder directory, a file list (.txt/.csv: path[,label] per line), "
    "torchvision:NAME[:SPLIT] (with root=) or a built-in name"
)


@dataclass
class Source:
    """A resolved SOURCE. ``item(i)`` → (("bytes", ext, data) | ("array", a) | ("pil", im), cls)."""

    description: str
    info: dict[str, Any]  # kind, path and options: recorded in the manifest
    num_samples: int
    classes: list[str] | None
    item: Callable[[int], tuple[tuple, int | None]]


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


def check_arrays(x: Any, y: Any, where: str) -> tuple[np.ndarray, np.ndarray | None]:
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


def _array_source(x: np.ndarray, y: np.ndarray | None, description: str, info: dict) -> Source:
    def item(i: int) -> tuple[tuple, int | None]:
        # A negative label means "unknown" for that sample: no cls field.
        cls = None if y is None or y[i] < 0 else int(y[i])
        return ("array", x[i]), cls

    return Source(description, info, int(x.shape[0]), None, item)


def _npz_source(path: Path) -> Source:
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
    return _array_source(x, y, f"npz:{path}", {"kind": "npz", "path": str(path)})


def _idx_source(images: Path, description: str | None = None) -> Source:
    x = _parse_idx(images)
    name = images.name
    label_name = name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
    labels = images.with_name(label_name)
    y = _parse_idx(labels) if label_name != name and labels.is_file() else None
    x, y = check_arrays(x, y, str(images))
    info = {"kind": "idx", "path": str(images), "labels": str(labels) if y is not None else None}
    return _array_source(x, y, description or f"idx:{images}", info)


def _idx_dir_source(root: Path, description: str | None = None) -> Source:
    found = sorted(p for p in root.iterdir() if p.is_file() and "idx3-ubyte" in p.name)
    if len(found) != 1:
        names = [p.name for p in found]
        raise ValueError(
            f"{root} must hold exactly one IDX images file (*idx3-ubyte[.gz]), found {names}; "
            "pass the images file itself as SOURCE"
        )
    return _idx_source(found[0], description)


def readable_extensions() -> dict[str, str]:
    """File extension ('.jpg') → Pillow format, for the formats Pillow can open."""
    Image.init()
    return {ext: f for ext, f in Image.registered_extensions().items() if f in Image.OPEN}


def _files_source(
    files: list[tuple[Path, int | None]], classes: list[str] | None, description: str, info: dict
) -> Source:
    def item(i: int) -> tuple[tuple, int | None]:
        path, cls = files[i]
        return ("bytes", path.suffix.lower().lstrip("."), path.read_bytes(), str(path)), cls

    return Source(description, info, len(files), classes, item)


def _folder_source(root: Path) -> Source:
    exts = readable_extensions()

    def images_under(d: Path) -> list[Path]:
        return sorted(
            p
            for p in d.rglob("*")
            if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")
        )

    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    top = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in exts]
    if subdirs and top:
        raise ValueError(
            f"{root} mixes image files ({top[0].name}, ...) with class subfolders; put every "
            "image in a class subfolder (or use only top-level images for an unlabelled set)"
        )
    files: list[tuple[Path, int | None]]
    if subdirs:
        classes: list[str] | None = [d.name for d in subdirs]
        files = [(p, c) for c, d in enumerate(subdirs) for p in images_under(d)]
    else:
        classes = None
        files = [(p, None) for p in images_under(root)]
    if not files:
        raise ValueError(
            f"no image files found under {root}; expected class subfolders holding images "
            f"readable by Pillow (e.g. {', '.join(sorted(exts)[:8])}, ...)"
        )
    info = {"kind": "imagefolder", "path": str(root)}
    return _files_source(files, classes, f"imagefolder:{root}", info)


def _list_source(path: Path) -> Source:
    """``path[,label]`` per line (comma or tab); relative paths are relative to the list file.
    Integer labels are class ids; any other labels are class names (sorted)."""
    delimiter = "\t" if path.suffix == ".tsv" else ","
    rows: list[tuple[Path, str | None]] = []
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter=delimiter), 1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) > 2:
                raise ValueError(f"{path}:{line_no}: expected 'path[,label]', got {row!r}")
            file = Path(row[0].strip())
            file = file if file.is_absolute() else path.parent / file
            if not file.is_file():
                raise ValueError(f"{path}:{line_no}: image file {file} does not exist")
            label = row[1].strip() if len(row) == 2 and row[1].strip() else None
            rows.append((file, label))
    if not rows:
        raise ValueError(f"{path} lists no image files; expected 'path[,label]' per line")
    labels = {lab for _, lab in rows if lab is not None}
    classes: list[str] | None = None
    if all(lab.lstrip("-").isdigit() for lab in labels):
        files = [(p, None if lab is None or int(lab) < 0 else int(lab)) for p, lab in rows]
    else:
        classes = sorted(labels)
        index = {c: k for k, c in enumerate(classes)}
        files = [(p, None if lab is None else index[lab]) for p, lab in rows]
    return _files_source(
        files, classes, f"filelist:{path}", {"kind": "filelist", "path": str(path)}
    )


def _torchvision_source(spec: str, root: str | os.PathLike | None) -> Source:
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
    params = inspect.signature(cls).parameters
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
        return _files_source(files, classes, desc, info)
    if data is not None and targets is not None and len(data) == len(ds):
        x, y = check_arrays(np.asarray(data), np.asarray(targets), desc)  # in-memory arrays
        src = _array_source(x, y, desc, info)
        src.classes = classes
        return src

    def item(i: int) -> tuple[tuple, int | None]:
        im, target = ds[i]
        return ("pil", im), int(target) if isinstance(target, int) else None

    return Source(desc, info, len(ds), classes, item)


def resolve_source(source: str | os.PathLike, root: str | os.PathLike | None = None) -> Source:
    """Work out what kind of SOURCE ``source`` is."""
    text = str(source)
    if text.startswith("torchvision:"):
        return _torchvision_source(text, root)
    path = Path(source)
    if text in BUILTIN and not path.exists():
        src = _idx_dir_source(BUILTIN[text], f"builtin:{text}")
        src.info = {"kind": "builtin", "name": text}
        return src
    if not path.exists():
        raise FileNotFoundError(
            f"source {text} does not exist; give {_KINDS} ({', '.join(BUILTIN)})"
        )
    path = path.resolve()
    if path.is_file() and path.suffix == ".npz":
        return _npz_source(path)
    if path.is_file() and "idx3-ubyte" in path.name:
        return _idx_source(path)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return _list_source(path)
    if path.is_dir():
        if any(p.is_file() and "idx3-ubyte" in p.name for p in path.iterdir()):
            return _idx_dir_source(path)
        return _folder_source(path)
    raise ValueError(f"unknown source kind: {path}; expected {_KINDS} ({', '.join(BUILTIN)})")


_STATE: tuple | None = None  # (source, options, encoder) in a writer process


def _init_worker(state: tuple) -> None:
    global _STATE
    _STATE = state


def _encode_range(bounds: tuple[int, int]) -> list[tuple]:
    assert _STATE is not None
    src, opts, fn = _STATE
    out = []
    for i in range(*bounds):
        raw, cls = src.item(i)
        out.append((*fn(raw, opts), cls))
    return out


def encode_parallel(
    src: Source, opts: dict, workers: int, fn: Callable[[tuple, dict], tuple], chunk: int = 64
) -> Iterator[tuple]:
    """``fn(raw item, opts) + (cls,)`` for every item in source order, computed by ``workers``
    forked processes (the result does not depend on how many)."""
    ranges = [(a, min(a + chunk, src.num_samples)) for a in range(0, src.num_samples, chunk)]
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        _init_worker((src, opts, fn))
        for r in ranges:
            yield from _encode_range(r)
        return
    # fork: the source (arrays, file lists, datasets) is inherited, not pickled.
    with mp.get_context("fork").Pool(workers, _init_worker, ((src, opts, fn),)) as pool:
        for part in pool.imap(_encode_range, ranges):
            yield from part
