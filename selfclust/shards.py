"""Write and check selfclust's WebDataset shards.

A shard directory holds ``shard-000000.tar``, ``shard-000001.tar``, ... and ``manifest.json``.
Each sample in a shard has ``__key__`` = the zero-padded global index (``f"{idx:09d}"``), one
image field named by its encoding (``png`` for array sources, the file's own extension for
image folders), ``idx`` (text int, 0..N-1 in source order) and, when the class is known,
``cls`` (text int; used for evaluation only, never for training).

The manifest records::

    {"format": "selfclust-shards/1", "num_samples": N,
     "shards": [{"name", "count", "sha256", "first_idx"}, ...],
     "classes": [names] | null, "image": {"height", "width", "channels"} | null,
     "channels": 1 | 3, "source": "..."}

``image`` is set when every image has the same size and channel count; ``channels`` (1 for
grayscale, 3 for colour) is always set and is what readers convert every image to.
Shard ``i`` holds the idx range ``first_idx .. first_idx + count - 1`` in order.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError

FORMAT = "selfclust-shards/1"
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
BUILTIN = {"mnist_test": Path(__file__).parent / "data" / "mnist_test"}
# Pillow modes that stay one channel; every other mode is converted to RGB.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
ARRAY_FORMATS = {"png": ("PNG", {}), "jpg": ("JPEG", {"quality": 95})}
_TAR_MTIME = 0  # fixed member mtime, so the same source gives byte-identical shards
_SHARD_HELP = "create one with `selfclust shard SOURCE OUT`"


def channels_for_mode(mode: str) -> int:
    """Channels a Pillow image of ``mode`` decodes to in selfclust: 1 (grayscale) or 3 (RGB)."""
    return 1 if mode in GRAY_MODES else 3


@dataclass
class _Source:
    """A resolved SOURCE: ``samples()`` yields (image field, encoded bytes, class or None)."""

    description: str
    num_samples: int
    classes: list[str] | None
    samples: Any  # () -> Iterator[tuple[str, bytes, int | None]]
    shapes: set[tuple[int, int, int]] = field(default_factory=set)  # filled while writing


def _parse_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) holding unsigned bytes."""
    opener = gzip.open if path.name.endswith(".gz") else open
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


def _check_arrays(x: Any, y: Any, where: str) -> tuple[np.ndarray, np.ndarray | None]:
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


def _array_source(x: np.ndarray, y: np.ndarray | None, description: str, fmt: str) -> _Source:
    if fmt not in ARRAY_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(ARRAY_FORMATS)}, got {fmt!r}")
    pil_format, options = ARRAY_FORMATS[fmt]
    src = _Source(description, int(x.shape[0]), None, None)
    channels = 1 if x.ndim == 3 else 3
    src.shapes.add((int(x.shape[1]), int(x.shape[2]), channels))

    def samples() -> Iterator[tuple[str, bytes, int | None]]:
        for i in range(x.shape[0]):
            buf = io.BytesIO()
            Image.fromarray(x[i]).save(buf, format=pil_format, **options)
            # A negative label means "unknown" for that sample: no cls field.
            cls = None if y is None or y[i] < 0 else int(y[i])
            yield fmt, buf.getvalue(), cls

    src.samples = samples
    return src


def _npz_source(path: Path, fmt: str) -> _Source:
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
    x, y = _check_arrays(x, y, str(path))
    return _array_source(x, y, f"npz:{path}", fmt)


def _idx_source(images: Path, fmt: str, description: str | None = None) -> _Source:
    x = _parse_idx(images)
    name = images.name
    label_name = name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
    labels = images.with_name(label_name)
    y = _parse_idx(labels) if label_name != name and labels.is_file() else None
    x, y = _check_arrays(x, y, str(images))
    return _array_source(x, y, description or f"idx:{images}", fmt)


def _idx_dir_source(root: Path, fmt: str, description: str | None = None) -> _Source:
    found = sorted(p for p in root.iterdir() if p.is_file() and "idx3-ubyte" in p.name)
    if len(found) != 1:
        names = [p.name for p in found]
        raise ValueError(
            f"{root} must hold exactly one IDX images file (*idx3-ubyte[.gz]), found {names}; "
            "pass the images file itself as SOURCE"
        )
    return _idx_source(found[0], fmt, description)


def _readable_extensions() -> dict[str, str]:
    """File extension ('.jpg') → Pillow format, for the formats Pillow can open."""
    Image.init()
    return {ext: f for ext, f in Image.registered_extensions().items() if f in Image.OPEN}


def _folder_source(root: Path) -> _Source:
    exts = _readable_extensions()

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
    src = _Source(f"imagefolder:{root}", len(files), classes, None)

    def samples() -> Iterator[tuple[str, bytes, int | None]]:
        for path, cls in files:
            data = path.read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()  # decode fully: a truncated file fails here, not mid-training
                    src.shapes.add((im.height, im.width, channels_for_mode(im.mode)))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise ValueError(
                    f"unreadable image file {path}: {e}; remove or replace it and shard again"
                ) from e
            yield path.suffix.lower().lstrip("."), data, cls

    src.samples = samples
    return src


def _resolve_source(source: str | os.PathLike, image_format: str = "png") -> _Source:
    """Work out what kind of SOURCE ``source`` is (see :func:`write_shards`)."""
    text = str(source)
    path = Path(source)
    if text in BUILTIN and not path.exists():
        return _idx_dir_source(BUILTIN[text], image_format, f"builtin:{text}")
    if not path.exists():
        raise FileNotFoundError(
            f"source {text} does not exist; give an .npz file, an IDX images file "
            f"(*idx3-ubyte.gz), an image-folder directory or a built-in name ({', '.join(BUILTIN)})"
        )
    path = path.resolve()
    if path.is_file() and path.suffix == ".npz":
        return _npz_source(path, image_format)
    if path.is_file() and "idx3-ubyte" in path.name:
        return _idx_source(path, image_format)
    if path.is_dir():
        if any(p.is_file() and "idx3-ubyte" in p.name for p in path.iterdir()):
            return _idx_dir_source(path, image_format)
        return _folder_source(path)
    raise ValueError(
        f"unknown source kind: {path}; expected an .npz file with x/y, an IDX images file "
        f"(*idx3-ubyte[.gz]), an image-folder directory or a built-in name ({', '.join(BUILTIN)})"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_out(out: Path) -> None:
    """Refuse an OUT that exists and is not a (possibly empty) previous shard directory."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory; choose another OUT")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    foreign = [
        n for n in entries if n != MANIFEST and not (n.startswith("shard-") and n.endswith(".tar"))
    ]
    if MANIFEST not in entries or foreign:
        raise ValueError(
            f"output {out} is not empty and is not a selfclust shard directory "
            f"(found {', '.join((foreign or entries)[:5])}); choose an empty or new OUT"
        )
    try:
        with open(out / MANIFEST) as f:
            fmt = json.load(f).get("format")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(
            f"output {out} has an unreadable {MANIFEST} ({e}); remove OUT first"
        ) from e
    if fmt != FORMAT:
        raise ValueError(f"output {out} holds a manifest of format {fmt!r}, not {FORMAT!r}")


class _ShardFile:
    """One shard being written: a TarWriter over a file that is fsynced when closed."""

    def __init__(self, path: Path):
        self.stream = open(path, "wb")
        self.writer = wds.TarWriter(self.stream, mtime=_TAR_MTIME)

    def close(self) -> None:
        self.writer.close()  # writes the tar end blocks into the stream
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()


def _write_into(src: _Source, tmp: Path, shard_size: int) -> list[dict]:
    shards: list[dict] = []
    current: _ShardFile | None = None
    try:
        for idx, (ext, data, cls) in enumerate(src.samples()):
            if idx % shard_size == 0:
                if current is not None:
                    current.close()
                name = SHARD_PATTERN.format(len(shards))
                shards.append({"name": name, "count": 0, "sha256": "", "first_idx": idx})
                current = _ShardFile(tmp / name)
            sample = {"__key__": f"{idx:09d}", ext: data, "idx": str(idx)}
            if cls is not None:
                sample["cls"] = str(cls)
            current.writer.write(sample)  # type: ignore[union-attr]
            shards[-1]["count"] += 1
    finally:
        if current is not None:
            current.close()
    for s in shards:
        s["sha256"] = _sha256(tmp / s["name"])
    return shards


def write_shards(
    source: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int = 5000,
    image_format: str = "png",
) -> dict:
    """Write SOURCE as WebDataset shards plus ``manifest.json`` into OUT; return the manifest.

    SOURCE is an ``.npz`` with ``x`` (uint8, (N,H,W) or (N,H,W,C)) and optional ``y``; an IDX
    images file ``*idx3-ubyte[.gz]`` (labels beside it as ``*labels-idx1-ubyte[.gz]``) or a
    directory holding exactly one; an image-folder tree (sorted class subfolders, files kept as
    their encoded bytes); or a built-in name (``mnist_test``). Array images are encoded as
    ``image_format`` (``png``, lossless, or ``jpg``).

    The shards are written into a temporary directory beside OUT that is renamed into place at
    the end, so an interrupted write never leaves a manifest pointing at partial shards. An
    existing OUT is replaced only if it is empty or a previous selfclust shard directory.
    """
    if not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    src = _resolve_source(source, image_format)
    out = Path(out).absolute()
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards = _write_into(src, tmp, shard_size)
        total = sum(s["count"] for s in shards)
        if total == 0:
            raise ValueError(f"source {source} holds no images")
        channels = max(c for _, _, c in src.shapes)
        uniform = len(src.shapes) == 1
        h, w, c = next(iter(src.shapes))
        manifest = {
            "format": FORMAT,
            "num_samples": total,
            "shards": shards,
            "classes": src.classes,
            "image": {"height": h, "width": w, "channels": c} if uniform else None,
            "channels": channels,
            "source": src.description,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, replacing a previous shard directory."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "d")
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old / "d", out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _validate_manifest(m: Any, where: str) -> dict:
    def bad(why: str) -> ValueError:
        return ValueError(f"{where} is not a valid selfclust manifest: {why}; {_SHARD_HELP}")

    if not isinstance(m, dict):
        raise bad("not a JSON object")
    if m.get("format") != FORMAT:
        raise bad(f"format is {m.get('format')!r}, expected {FORMAT!r}")
    n, shards = m.get("num_samples"), m.get("shards")
    if not isinstance(n, int) or n < 1:
        raise bad(f"num_samples must be a positive integer, got {n!r}")
    if not isinstance(shards, list) or not shards:
        raise bad("no shards listed")
    first = 0
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or not {"name", "count", "sha256", "first_idx"} <= set(s):
            raise bad(f"shard entry {i} lacks name/count/sha256/first_idx")
        name = s["name"]
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise bad(f"shard entry {i} has a bad name {name!r}")
        if not isinstance(s["count"], int) or s["count"] < 0 or s["first_idx"] != first:
            raise bad(
                f"shard {name}: count {s['count']!r} / first_idx {s['first_idx']!r} "
                f"do not continue the idx range (expected first_idx {first})"
            )
        first += s["count"]
    if first != n:
        raise bad(f"shard counts sum to {first}, num_samples is {n}")
    classes = m.get("classes")
    if classes is not None and not (
        isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    ):
        raise bad("classes must be a list of names or null")
    image = m.get("image")
    if image is not None and not (
        isinstance(image, dict) and {"height", "width", "channels"} <= set(image)
    ):
        raise bad("image must be {height, width, channels} or null")
    m.setdefault("channels", image["channels"] if image else 3)
    if m["channels"] not in (1, 3):
        raise bad(f"channels must be 1 or 3, got {m['channels']!r}")
    return m


def load_manifest(shard_dir_or_url: str | os.PathLike) -> dict:
    """Read and validate ``manifest.json`` of a shard directory (local path or http(s) URL)."""
    where = str(shard_dir_or_url)
    if _is_url(where):
        url = where if where.endswith(".json") else where.rstrip("/") + "/" + MANIFEST
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                text = r.read().decode("utf-8")
        except OSError as e:
            raise FileNotFoundError(f"cannot fetch {url}: {e}; is it a selfclust shard URL?") from e
    else:
        path = Path(where)
        if path.is_dir():
            path = path / MANIFEST
            if not path.is_file():
                raise FileNotFoundError(
                    f"{where} is not a selfclust shard directory: no {MANIFEST}; {_SHARD_HELP}"
                )
        elif not path.is_file():
            raise FileNotFoundError(f"shard directory {where} does not exist; {_SHARD_HELP}")
        text = path.read_text()
    try:
        m = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: {MANIFEST} is not valid JSON ({e}); {_SHARD_HELP}") from e
    return _validate_manifest(m, where)


def verify_shards(shard_dir: str | os.PathLike) -> None:
    """Re-read every shard: check its sha256, its sample count and that idx covers 0..N-1 once.

    Raises ValueError naming the first bad shard.
    """
    root = Path(shard_dir)
    m = load_manifest(root)
    seen = np.zeros(m["num_samples"], dtype=bool)
    for s in m["shards"]:
        path, name = root / s["name"], s["name"]
        if not path.is_file():
            raise ValueError(f"shard {name} is missing from {root}; write the shards again")
        if _sha256(path) != s["sha256"]:
            raise ValueError(f"shard {name} is corrupt: sha256 differs from the manifest")
        count = 0
        for sample in wds.tarfile_samples([{"url": str(path)}]):
            idx = int(sample["idx"]) if "idx" in sample else -1
            if not 0 <= idx < len(seen) or seen[idx] or sample["__key__"] != f"{idx:09d}":
                raise ValueError(f"shard {name}: sample {sample['__key__']!r} has bad idx {idx}")
            seen[idx] = True
            count += 1
        if count != s["count"]:
            raise ValueError(f"shard {name} holds {count} samples, the manifest says {s['count']}")
    if not seen.all():
        raise ValueError(f"{root}: idx {int(np.argmin(seen))} is in no shard")
