"""Write a shard set: ``selfclust shard SOURCE OUT``.

The format and the manifest are :mod:`selfclust.shards.manifest`'s. Shards are cut at
``shard_size`` samples or before the file would exceed ``shard_bytes`` (a sample larger
than that gets a shard of its own), whichever comes first; the output is the same whatever the
number of writer processes. Files of an image folder or file list that cannot be read are
skipped and listed in ``skipped.txt`` (:mod:`selfclust.shards.skipped`) unless ``strict``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds

from selfclust.data.urls import MANIFEST
from selfclust.shards.encode import ARRAY_FORMATS, ENCODINGS, encode_item
from selfclust.shards.encode_pool import encode_parallel
from selfclust.shards.manifest import FORMAT, build_manifest, write_manifest
from selfclust.shards.skipped import SKIPPED, Skipped, nothing_readable, write_skip_list
from selfclust.shards.sources import resolve_source
from selfclust.shards.upload import Uploader

SHARD_PATTERN = "shard-{:06d}.tar"
_TAR_MTIME = 0  # fixed member mtime, so the same source gives byte-identical shards


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
        n
        for n in entries
        if n not in (MANIFEST, SKIPPED) and not (n.startswith("shard-") and n.endswith(".tar"))
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
    encoded: Iterator[tuple[str, bytes, tuple[int, int, int], int | None] | Skipped],
    tmp: Path,
    shard_size: int,
    shard_bytes: int | None,
    shapes: set[tuple[int, int, int]],
    skipped: list[Skipped],
    uploader: Uploader | None,
) -> list[dict]:
    """Cut ``encoded`` into shards in ``tmp``; idx counts the kept samples only, so it stays
    0..N-1 whatever was skipped. Adds to ``shapes`` and ``skipped`` as it goes."""
    shards: list[dict] = []
    current: _ShardFile | None = None
    size = 0
    idx = 0

    def finish(f: _ShardFile) -> None:
        f.close()
        shards[-1]["sha256"] = _sha256(f.path)
        shards[-1]["bytes"] = f.path.stat().st_size
        if uploader is not None:
            uploader.submit(f.path)

    try:
        for item in encoded:
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            ext, data, shape, cls = item
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
            idx += 1
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
    strict: bool = False,
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

    Image files that are gone, empty, truncated, not images or decompression bombs are skipped:
    the manifest counts them (``skipped``) and ``OUT/skipped.txt`` lists them with the reason
    (uploaded before the manifest); ``strict=True`` stops at the first one instead. A source
    with no readable file at all is an error.

    The shards are written into a temporary directory beside OUT that is renamed into place at
    the end, so an interrupted write never leaves a manifest pointing at partial shards. An
    existing OUT is replaced only if it is empty or a previous selfclust shard directory.
    """
    _check_args(shard_size, shard_bytes, image_format, encode, quality, max_side, workers, post)
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
        skipped: list[Skipped] = []
        encoded = encode_parallel(src, opts, workers, encode_item, strict=strict)
        shards = _write_into(encoded, tmp, shard_size, shard_bytes, shapes, skipped, uploader)
        if not shards:
            raise nothing_readable(str(source), skipped)
        if skipped:
            write_skip_list(tmp / SKIPPED, skipped)
            if uploader is not None:
                uploader.submit(tmp / SKIPPED, keep=True)
        if uploader is not None:
            uploader.wait()  # every shard (and the skip list) uploaded before the manifest
        manifest = build_manifest(
            src, shards, shapes, opts, shard_size, shard_bytes, skipped=len(skipped)
        )
        write_manifest(tmp / MANIFEST, manifest)
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


def _check_args(
    shard_size: int,
    shard_bytes: int | None,
    image_format: str,
    encode: str,
    quality: int,
    max_side: int | None,
    workers: int,
    post: str | None,
) -> None:
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
