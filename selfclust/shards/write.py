"""Write and check selfclust's WebDataset shards.

A shard directory holds ``shard-000000.tar``, ``shard-000001.tar``, ... and ``manifest.json``.
Each sample in a shard has ``__key__`` = the zero-padded global index (``f"{idx:09d}"``), one
image field named by its encoding (``png``/``jpg`` when encoded here, the file's own extension
when file bytes are kept), ``idx`` (text int, 0..N-1 in source order) and, when the class is
known, ``cls`` (text int; used for evaluation only, never for training).

The manifest records::

    {"format": "selfclust-shards/1", "num_samples": N,
     "shards": [{"name", "count", "sha256", "first_idx", "bytes"}, ...],
     "classes": [names] | null, "image": {"height", "width", "channels"} | null,
     "channels": 1 | 3, "source": "kind:path", "source_info": {...}, "writer": {...}}

``image`` is set when every image has the same size and channel count; ``channels`` (1 for
grayscale, 3 for colour) is always set and is what readers convert every image to.
Shard ``i`` holds the idx range ``first_idx .. first_idx + count - 1`` in order. Shards are
cut at ``shard_size`` samples or before the file would exceed ``shard_bytes`` (a sample larger
than that gets a shard of its own), whichever comes first; the output is the same whatever the
number of writer processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from selfclust.data.reader import tar_samples
from selfclust.data.urls import (
    DEFAULT_TIMEOUT_S,
    MANIFEST,
    ShardNotFound,
    open_url,
    parse_spec,
    read_url,
)
from selfclust.shards.sources import BUILTIN, Source, encode_parallel, resolve_source
from selfclust.shards.upload import Uploader

__all__ = ["BUILTIN", "MANIFEST", "load_manifest", "verify_shards", "write_shards"]

FORMAT = "selfclust-shards/1"
SHARD_PATTERN = "shard-{:06d}.tar"
# Pillow modes that stay one channel; every other mode is converted to RGB.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
ENCODINGS = ("keep", "png", "jpeg")
ARRAY_FORMATS = ("png", "jpg")
_TAR_MTIME = 0  # fixed member mtime, so the same source gives byte-identical shards
_SHARD_HELP = "create one with `selfclust shard SOURCE OUT`"
_BAD_IMAGE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30})


def parse_bytes(text: str) -> int:
    """'1GB' → 10**9, '512MiB' → 2**29, '2e9' → 2000000000."""
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("BKMGI")
    unit = t[len(num) :]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 1GB, 500MB, 512MiB") from e
    if value < 1:
        raise ValueError(f"size {text!r} must be at least one byte")
    return int(value)


def channels_for_mode(mode: str) -> int:
    """Channels a Pillow image of ``mode`` decodes to in selfclust: 1 (grayscale) or 3 (RGB)."""
    return 1 if mode in GRAY_MODES else 3


def encode_item(raw: tuple, opts: dict[str, Any]) -> tuple[str, bytes, tuple[int, int, int]]:
    """One source item → (image field, bytes, (h, w, channels)), re-encoded/resized as asked.

    File bytes are decoded fully even when kept, so a broken file fails here, not in training.
    """
    where = raw[3] if raw[0] == "bytes" else "an array image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im: Image.Image
            if raw[0] == "bytes":
                im = Image.open(io.BytesIO(raw[2]))
                src_format = im.format
            else:
                im = Image.fromarray(raw[1]) if raw[0] == "array" else raw[1]
                src_format = None
            side = opts["max_side"]
            if side and max(im.size) > side:
                im.thumbnail((side, side), Image.Resampling.BICUBIC)  # JPEG: DCT-scaled decode
                resized = True
            else:
                im.load()
                resized = False
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(
            f"refused image file {where}: {e}; it is a decompression bomb (or needs "
            "PIL.Image.MAX_IMAGE_PIXELS raised)"
        ) from e
    except _BAD_IMAGE as e:
        raise ValueError(
            f"unreadable image file {where}: {e}; remove or replace it and shard again"
        ) from e
    channels = channels_for_mode(im.mode)
    encode = opts["encode"]
    if raw[0] == "bytes" and encode == "keep" and not resized:
        return raw[1], raw[2], (im.height, im.width, channels)
    if encode == "keep":  # arrays: the array format; resized files: their own kind
        fmt = (
            opts["array_format"]
            if raw[0] != "bytes"
            else ("jpg" if src_format == "JPEG" else "png")
        )
    else:
        fmt = "jpg" if encode == "jpeg" else "png"
    im = im.convert("L" if channels == 1 else "RGB") if im.mode not in ("L", "RGB") else im
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=opts["quality"])
    else:
        im.save(buf, format="PNG")
    return fmt, buf.getvalue(), (im.height, im.width, channels)


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
        self.path = path
        self.stream = open(path, "wb")
        self.writer = wds.TarWriter(self.stream, mtime=_TAR_MTIME)

    def close(self) -> None:
        self.writer.close()  # writes the tar end blocks into the stream
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()


def _tar_bytes(sample: dict) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per field, data padded to 512."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if k != "__key__")


def _tar_budget(shard_bytes: int) -> int:
    """Member bytes that fit in a file of ``shard_bytes``: tarfile ends an archive with two
    zero blocks and pads it to whole 10240-byte records."""
    return (shard_bytes // tarfile.RECORDSIZE) * tarfile.RECORDSIZE - 2 * tarfile.BLOCKSIZE


def _write_into(
    encoded: Iterator[tuple[str, bytes, tuple[int, int, int], int | None]],
    tmp: Path,
    shard_size: int,
    shard_bytes: int | None,
    shapes: set[tuple[int, int, int]],
    uploader: Uploader | None,
) -> list[dict]:
    shards: list[dict] = []
    current: _ShardFile | None = None
    size = 0

    def finish(f: _ShardFile) -> None:
        f.close()
        shards[-1]["sha256"] = _sha256(f.path)
        shards[-1]["bytes"] = f.path.stat().st_size
        if uploader is not None:
            uploader.submit(f.path)

    try:
        for idx, (ext, data, shape, cls) in enumerate(encoded):
            shapes.add(shape)
            sample = {"__key__": f"{idx:09d}", ext: data, "idx": str(idx)}
            if cls is not None:
                sample["cls"] = str(cls)
            need = _tar_bytes(sample)
            full = current is not None and (
                shards[-1]["count"] == shard_size
                or (shard_bytes is not None and size + need > _tar_budget(shard_bytes))
            )
            if current is None or full:
                if current is not None:
                    finish(current)
                name = SHARD_PATTERN.format(len(shards))
                shards.append({"name": name, "count": 0, "sha256": "", "first_idx": idx})
                current, size = _ShardFile(tmp / name), 0
            current.writer.write(sample)
            shards[-1]["count"] += 1
            size += need
        if current is not None:
            finish(current)
            current = None
    finally:
        if current is not None:
            current.close()
    return shards


def write_shards(
    source: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int = 5000,
    image_format: str = "png",
    *,
    shard_bytes: int | None = None,
    encode: str = "keep",
    quality: int = 95,
    max_side: int | None = None,
    workers: int = 1,
    post: str | None = None,
    keep_local: bool = True,
    root: str | os.PathLike | None = None,
) -> dict:
    """Write SOURCE as WebDataset shards plus ``manifest.json`` into OUT; return the manifest.

    SOURCE (see :mod:`selfclust.shards.sources`):
    an ``.npz`` with ``x``/``y``; an IDX images file (or
    a directory holding one); an image-folder tree (any format Pillow reads; class = sorted
    subfolder); a file list (``path[,label]`` per line); ``torchvision:NAME[:SPLIT]`` stored
    under ``root``; or a built-in name (``mnist_test``).

    ``encode``: ``keep`` (file bytes as they are; arrays as ``image_format``, png or jpg),
    ``png`` or ``jpeg`` (at ``quality``). ``max_side``: shrink images whose longer side is
    larger (aspect kept). ``workers``: processes that decode/encode in parallel. ``post``: a
    shell command run for each finished file with ``{path}`` and ``{name}`` filled in (e.g.
    ``aws s3 cp {path} s3://bucket/set/{name}``); the manifest goes last, after every shard
    uploaded, and ``keep_local=False`` deletes each local shard once it is uploaded.

    The shards are written into a temporary directory beside OUT that is renamed into place at
    the end, so an interrupted write never leaves a manifest pointing at partial shards. An
    existing OUT is replaced only if it is empty or a previous selfclust shard directory.
    """
    if not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if shard_bytes is not None and shard_bytes < 1:
        raise ValueError(f"shard_bytes must be a positive number of bytes, got {shard_bytes!r}")
    if image_format not in ARRAY_FORMATS:
        raise ValueError(f"image_format must be one of {list(ARRAY_FORMATS)}, got {image_format!r}")
    if encode not in ENCODINGS:
        raise ValueError(f"encode must be one of {list(ENCODINGS)}, got {encode!r}")
    if not 1 <= quality <= 100 or (max_side is not None and max_side < 1) or workers < 1:
        raise ValueError(
            "need 1 <= quality <= 100, max_side >= 1, workers >= 1; "
            f"got {quality}, {max_side}, {workers}"
        )
    if post is not None and "{path}" not in post:
        raise ValueError(f"post command {post!r} must contain {{path}} (and usually {{name}})")
    src = resolve_source(source, root)
    opts = {
        "encode": encode,
        "quality": quality,
        "max_side": max_side,
        "array_format": image_format,
    }
    out = Path(out).absolute()
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    uploader = Uploader(post, keep_local) if post else None
    try:
        shapes: set[tuple[int, int, int]] = set()
        encoded = encode_parallel(src, opts, workers, encode_item)
        shards = _write_into(encoded, tmp, shard_size, shard_bytes, shapes, uploader)
        total = sum(s["count"] for s in shards)
        if total == 0:
            raise ValueError(f"source {source} holds no images")
        if uploader is not None:
            uploader.wait()  # every shard uploaded before the manifest
        manifest = _manifest(src, shards, shapes, opts, shard_size, shard_bytes)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if uploader is not None:
            uploader.submit(tmp / MANIFEST, keep=True)
            uploader.wait()
        _swap_into_place(tmp, out)
    except BaseException:
        if uploader is not None:
            uploader.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _manifest(
    src: Source,
    shards: list[dict],
    shapes: set,
    opts: dict,
    shard_size: int,
    shard_bytes: int | None,
) -> dict:
    channels = max(c for _, _, c in shapes)
    h, w, c = next(iter(shapes))
    return {
        "format": FORMAT,
        "num_samples": sum(s["count"] for s in shards),
        "shards": shards,
        "classes": src.classes,
        "image": {"height": h, "width": w, "channels": c} if len(shapes) == 1 else None,
        "channels": channels,
        "source": src.description,
        "source_info": src.info,
        "writer": {**opts, "shard_size": shard_size, "shard_bytes": shard_bytes},
    }


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


def load_manifest(spec: str | os.PathLike, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """Read and validate the manifest of a shard set (any spec of :mod:`selfclust.data.urls`)."""
    where = str(spec)
    url = parse_spec(where).manifest_url
    path = Path(where)
    if parse_spec(where).is_local and not where.endswith(".json") and "{" not in where:
        if not path.exists():
            raise FileNotFoundError(f"shard directory {where} does not exist; {_SHARD_HELP}")
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(
                f"{where} is not a selfclust shard directory: no {MANIFEST}; {_SHARD_HELP}"
            )
    try:
        text = read_url(url, timeout_s).decode("utf-8")
    except ShardNotFound as e:
        raise FileNotFoundError(f"cannot read the manifest: {e}; {_SHARD_HELP}") from e
    except OSError as e:
        raise FileNotFoundError(f"cannot read the manifest {url}: {e}") from e
    try:
        m = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: {MANIFEST} is not valid JSON ({e}); {_SHARD_HELP}") from e
    return _validate_manifest(m, where)


class _Hashing(io.RawIOBase):
    """Passes a stream through while hashing it (checksum and parse in one read)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.sha = stream, hashlib.sha256()

    def drain(self) -> None:
        for block in iter(lambda: self.stream.read(1 << 20), b""):
            self.sha.update(block)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        data = self.stream.read(len(buf))
        self.sha.update(data)
        buf[: len(data)] = data
        return len(data)


def verify_shards(
    spec: str | os.PathLike, decode: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S
) -> dict:
    """Re-read every shard of a set (local, http(s), pipe:): check its sha256, sample count,
    that idx covers 0..N-1 once in order and, with ``decode``, that every image decodes.

    Returns ``{"num_samples", "shards", "bytes"}``; raises ValueError listing the bad shards.
    """
    from selfclust.data.reader import image_field, open_image

    m = load_manifest(spec, timeout_s)
    s = parse_spec(str(spec))
    problems: list[str] = []
    total_bytes = 0
    for sh in m["shards"]:
        name, first = sh["name"], sh["first_idx"]
        try:
            with open_url(s.url(name), timeout_s) as stream:
                hashing = _Hashing(stream)
                count = 0
                for sample in tar_samples(io.BufferedReader(hashing, 1 << 20)):
                    idx = int(sample["idx"]) if "idx" in sample else -1
                    if idx != first + count or sample["__key__"] != f"{idx:09d}":
                        raise ValueError(
                            f"sample {sample['__key__']!r} has idx {idx}, expected {first + count}"
                        )
                    if decode:
                        try:
                            open_image(image_field(sample), m["channels"])
                        except (
                            *_BAD_IMAGE,
                            Image.DecompressionBombError,
                            Image.DecompressionBombWarning,
                        ) as e:
                            problems.append(
                                f"shard {name}: image {sample['__key__']} does not decode ({e})"
                            )
                    count += 1
                hashing.drain()  # the tar's end blocks count in the checksum too
        except ShardNotFound as e:
            problems.append(f"shard {name} is missing ({e})")
            continue
        except (OSError, EOFError, ValueError, tarfile.TarError) as e:
            problems.append(f"shard {name} is unreadable: {e}")
            continue
        if count != sh["count"]:
            problems.append(f"shard {name} holds {count} samples, the manifest says {sh['count']}")
        elif hashing.sha.hexdigest() != sh["sha256"]:
            problems.append(f"shard {name} is corrupt: sha256 differs from the manifest")
        total_bytes += sh.get("bytes", 0)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("; ".join(problems[:5]) + more)
    return {"num_samples": m["num_samples"], "shards": len(m["shards"]), "bytes": total_bytes}
