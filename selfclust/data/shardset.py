"""A shard set opened for reading: its validated manifest and the URL of every shard."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from selfclust.data.urls import DEFAULT_TIMEOUT_S, is_local, parse_spec
from selfclust.shards.manifest import load_manifest


@dataclass
class ShardSet:
    """A shard set opened through its manifest (see :mod:`selfclust.data.urls` for the specs)."""

    root: str
    manifest: dict
    urls: list[str]
    counts: list[int]
    num_samples: int
    classes: list[str] | None
    image: dict | None
    first_idx: list[int] | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.first_idx is None:
            self.first_idx = [int(s["first_idx"]) for s in self.manifest["shards"]]

    @property
    def channels(self) -> int:
        """Channels every image is decoded to: 1 (grayscale) or 3 (RGB)."""
        return int(self.image["channels"] if self.image else self.manifest["channels"])

    @classmethod
    def open(cls, spec: str | os.PathLike, timeout_s: float = DEFAULT_TIMEOUT_S) -> ShardSet:
        """Open a local shard dir, an http(s) base URL, a ``pipe:...{name}...`` command or a
        brace pattern of shard names; validates the manifest."""
        text = str(spec).removeprefix("file://")
        if is_local(text) and "{" not in text:  # absolute: Ray workers run elsewhere
            text = str(Path(text).resolve())
        s = parse_spec(text)
        manifest = load_manifest(text, timeout_s)
        names = [sh["name"] for sh in manifest["shards"]]
        if s.names is not None and sorted(s.names) != sorted(names):
            extra = sorted(set(s.names) - set(names))[:3]
            missing = sorted(set(names) - set(s.names))[:3]
            raise ValueError(
                f"{text} must name exactly the {len(names)} shards of {s.manifest_url} "
                f"(the label pass needs every sample); not in the manifest: {extra}, "
                f"not in the pattern: {missing}"
            )
        local_dir = s.is_local and s.template.endswith("/{name}") and s.names is None
        root = s.template[: -len("/{name}")] if local_dir else text
        return cls(
            root=root,
            manifest=manifest,
            urls=[s.url(n) for n in names],
            counts=[int(sh["count"]) for sh in manifest["shards"]],
            num_samples=int(manifest["num_samples"]),
            classes=manifest.get("classes"),
            image=manifest.get("image"),
            timeout_s=timeout_s,
        )
