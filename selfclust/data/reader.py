"""Read samples out of shard streams and decode their images, surviving bad data.

* A shard that cannot be read to its end (truncated, corrupt tar, a connection that dies or
  stalls) is logged by name, counted in :class:`DataStats` and the rest of it is skipped; the
  samples read before the fault are kept. A shard that does not exist raises
  :class:`~selfclust.data.urls.ShardNotFound` naming it.
* An image that does not decode (corrupt bytes, unknown format, a decompression bomb that
  Pillow refuses under ``Image.MAX_IMAGE_PIXELS``) is counted and left out by the caller.
"""

from __future__ import annotations

import http.client
import io
import logging
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from selfclust.data.urls import DEFAULT_TIMEOUT_S, open_url

log = logging.getLogger("selfclust.data")
META = frozenset({"idx", "cls"})
# What a broken tar stream or connection raises while being read.
STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, http.client.HTTPException)
IMAGE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


@dataclass
class DataStats:
    """Bad data met while reading (per loader worker, summed over workers by the iterators).

    ``corrupt_images``: samples whose image did not decode (left out or replaced);
    ``missing_samples``: samples of unreadable shards that were never read;
    ``bad_shards``: shard URL → what went wrong, for each shard not read to its end.
    """

    corrupt_images: int = 0
    missing_samples: int = 0
    bad_shards: dict[str, str] = field(default_factory=dict)

    def add(self, other: DataStats) -> None:
        self.corrupt_images += other.corrupt_images
        self.missing_samples += other.missing_samples
        for url, why in other.bad_shards.items():
            self.bad_shards.setdefault(url, why)

    def copy(self) -> DataStats:
        return DataStats(self.corrupt_images, self.missing_samples, dict(self.bad_shards))

    @property
    def skipped(self) -> int:
        """Samples a pass did not deliver: corrupt images plus samples of unreadable shards."""
        return self.corrupt_images + self.missing_samples


def tar_samples(stream: Any) -> Iterator[dict]:
    """Group tar members into samples by key (the name up to the first dot)."""
    current: dict = {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            if current and key != current["__key__"]:
                yield current
                current = {}
            f = tar.extractfile(member)
            current.setdefault("__key__", key)
            current[ext] = f.read() if f is not None else b""
            tar.members = []  # type: ignore[attr-defined]  # streaming: don't keep every TarInfo of a large shard
    if current:
        yield current


def read_shard(
    url: str,
    stats: DataStats,
    first_idx: int,
    count: int,
    part: int = 0,
    nparts: int = 1,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Iterator[dict]:
    """Samples ``part, part + nparts, ...`` of the shard at ``url`` holding idx
    ``first_idx .. first_idx + count - 1``. A fault ends the shard early: it is logged and
    recorded in ``stats`` (with the number of this part's samples that were lost)."""
    expected = len(range(part, count, nparts))
    got = 0
    try:
        with open_url(url, timeout_s) as stream:
            for pos, sample in enumerate(tar_samples(stream)):
                if pos % nparts != part:
                    continue
                if got == expected:
                    raise ValueError(f"holds more than the {count} samples the manifest lists")
                idx = int(sample["idx"]) if "idx" in sample else int(sample["__key__"])
                if not first_idx <= idx < first_idx + count:
                    raise ValueError(
                        f"sample idx {idx} is outside the shard's range {first_idx}.."
                        f"{first_idx + count - 1}: shards of different writes are mixed"
                    )
                sample["__url__"] = url
                got += 1
                yield sample
        if got < expected:
            raise EOFError(f"ended after {got} of {expected} samples")
    except (*STREAM_ERRORS, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise  # a missing shard is an error, not bad data
        why = f"{type(e).__name__}: {e}"
        if url not in stats.bad_shards:
            log.warning("unreadable shard %s (%s); skipping the rest of it", url, why)
        stats.bad_shards.setdefault(url, why)
        stats.missing_samples += expected - got


def image_field(sample: dict) -> bytes:
    fields = [k for k in sample if not k.startswith("__") and k not in META]
    if len(fields) != 1:
        raise ValueError(
            f"sample {sample['__key__']} in {sample.get('__url__')} has image fields "
            f"{fields}; expected exactly one"
        )
    return sample[fields[0]]


def open_image(data: bytes, channels: int, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode to mode L (``channels == 1``) or RGB. ``draft``: a size the image may be decoded
    down to (JPEG DCT scaling, never below it) when it will be shrunk anyway.

    Raises (the caller counts) for bad bytes and decompression bombs: Pillow's warning band
    between ``MAX_IMAGE_PIXELS`` and twice that is refused too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        target = "L" if channels == 1 else "RGB"
        if draft is not None and im.format == "JPEG":
            im.draft(target, draft)
        im.load()
    return im if im.mode == target else im.convert(target)


def decode(
    sample: dict, channels: int, image_size: int | None
) -> tuple[np.ndarray, int, int] | None:
    """One sample → (uint8 [H, W, C], idx, cls or -1), or None when the image is bad."""
    try:
        draft = (image_size, image_size) if image_size else None
        im = open_image(image_field(sample), channels, draft)
        if image_size is not None and im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
        arr = np.asarray(im)
    except IMAGE_ERRORS as e:
        log.debug("corrupt image %s in %s: %s", sample["__key__"], sample.get("__url__"), e)
        return None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    idx = int(sample["idx"]) if "idx" in sample else int(sample["__key__"])
    cls = int(sample["cls"]) if "cls" in sample else -1
    return arr, idx, cls
