"""The manifest of a shard set: its schema, how the writer builds it, how readers load it.

A shard directory holds ``shard-000000.tar``, ``shard-000001.tar``, ... and ``manifest.json``.
Each sample in a shard has ``__key__`` = the zero-padded global index (``f"{idx:09d}"``), one
image field named by its encoding (``png``/``jpg`` when encoded here, the file's own extension
when file bytes are kept), ``idx`` (text int, 0..N-1 in source order) and, when the class is
known, ``cls`` (text int; used for evaluation only, never for training).

The manifest records::

    {"format": "selfclust-shards/1", "num_samples": N, "skipped": S,
     "shards": [{"name", "count", "sha256", "first_idx", "bytes"}, ...],
     "classes": [names] | null, "image": {"height", "width", "channels"} | null,
     "channels": 1 | 3, "source": "kind:path", "source_info": {...}, "writer": {...}}

``image`` is set when every image has the same size and channel count; ``channels`` (1 for
grayscale, 3 for colour) is always set and is what readers convert every image to.
Shard ``i`` holds the idx range ``first_idx .. first_idx + count - 1`` in order.
``skipped`` counts the source files left out because they could not be read (listed, with
the reason, in ``skipped.txt`` beside the manifest when there are any; see
:mod:`selfclust.shards.skipped`); idx numbers the kept samples only. Manifests written
before it was recorded have no ``skipped``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfclust.data.urls import DEFAULT_TIMEOUT_S, MANIFEST, ShardNotFound, parse_spec, read_url

if TYPE_CHECKING:
    from selfclust.shards.source import Source

FORMAT = "selfclust-shards/1"
_SHARD_HELP = "create one with `selfclust shard SOURCE OUT`"


def build_manifest(
    src: Source,
    shards: list[dict],
    shapes: set,
    opts: dict,
    shard_size: int,
    shard_bytes: int | None,
    skipped: int = 0,
) -> dict:
    """The manifest of a finished write: ``shards`` as written, ``shapes`` every (h, w, c) met,
    ``skipped`` the number of source files left out."""
    channels = max(c for _, _, c in shapes)
    h, w, c = next(iter(shapes))
    return {
        "format": FORMAT,
        "num_samples": sum(s["count"] for s in shards),
        "skipped": skipped,
        "shards": shards,
        "classes": src.classes,
        "image": {"height": h, "width": w, "channels": c} if len(shapes) == 1 else None,
        "channels": channels,
        "source": src.description,
        "source_info": src.info,
        "writer": {**opts, "shard_size": shard_size, "shard_bytes": shard_bytes},
    }


def write_manifest(path: Path, manifest: dict) -> None:
    """The manifest, flushed to disk (the writer then swaps the directory into place)."""
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def validate_manifest(m: Any, where: str) -> dict:
    """``m`` (parsed JSON read from ``where``) checked against the schema; fills in
    ``channels`` for manifests written before it was recorded."""

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
    return validate_manifest(m, where)
