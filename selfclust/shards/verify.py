"""``selfclust shard --verify``: re-read a shard set and check it against its manifest
(:func:`verify_shards`), or with ``--quick`` only that every shard is there at its size
(:func:`verify_quick`)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from typing import Any

from selfclust.data.preflight import check_shards
from selfclust.data.reader import IMAGE_ERRORS, image_field, open_image, tar_samples
from selfclust.data.shardset import ShardSet
from selfclust.data.urls import DEFAULT_TIMEOUT_S, ShardNotFound, open_url, parse_spec
from selfclust.shards.manifest import load_manifest


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
                        except IMAGE_ERRORS as e:
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


def verify_quick(
    spec: str | os.PathLike, timeout_s: float = DEFAULT_TIMEOUT_S, threads: int = 32
) -> dict:
    """Check only that every shard of a set exists and has the size its manifest records,
    without reading it (:func:`selfclust.data.preflight.check_shards`: a stat, an HTTP HEAD,
    or a ``pipe:`` command's first block per shard, ``threads`` at a time).

    Returns ``{"num_samples", "shards", "bytes", "sized"}``, ``sized`` being how many shards
    had their size compared (pipes and manifests without ``bytes``: existence only); raises
    :class:`~selfclust.data.preflight.BadShards` (a ValueError) naming the bad shards.
    """
    shards = ShardSet.open(spec, timeout_s)
    sized = check_shards(shards, timeout_s, threads)
    total_bytes = sum(sh.get("bytes", 0) for sh in shards.manifest["shards"])
    return {
        "num_samples": shards.num_samples,
        "shards": len(shards.urls),
        "bytes": total_bytes,
        "sized": sized,
    }
