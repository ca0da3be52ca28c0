"""``selfclust assign``: the cluster of every image of a shard set or an image folder.

The model comes from an export file (``selfclust export``) or straight from a run dir or
checkpoint dir. Images are decoded to the model's channels and resized to its side as in
training (:func:`selfclust.data.reader.open_image`, Pillow bilinear), then standardised by the
export's ``preprocess``. Each rank takes every ``world``-th shard (or file) and writes its
part; the parts are merged in sample order (a shard set's idx, a folder's sorted paths) into
one CSV or Parquet file: ``key``, then ``cluster`` and ``probability`` (the winning softmax
probability) of the best head, or of every head (``cluster_h0``, ``probability_h0``, ...).
Images that do not decode (and shards not readable to their end) are skipped, counted and
listed in ``OUT.skipped.csv``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from selfclust.data.reader import IMAGE_ERRORS, DataStats, image_field, open_image, read_shard
from selfclust.errors import UserError
from selfclust.export import export_state
from selfclust.exported import model_from_export, read_export

AUTO_MIN_IMAGES = 50_000  # ``--workers auto``: one rank per visible GPU only above this
SKIPPED_SUFFIX = ".skipped.csv"


class AssignError(UserError, ValueError):
    pass


@dataclass
class Inputs:
    """What to assign: ``units`` are (shard URL, first idx, count) or (file path, order)."""

    kind: str  # "shards" or "folder"
    root: str
    units: list[tuple[Any, ...]]
    num_images: int
    timeout_s: float = 30.0
    ignored: int = 0  # folder files whose extension is not an image format


def open_inputs(data: str | Path) -> Inputs:
    """A shard set (a dir with ``manifest.json``, a URL, a ``pipe:`` spec), or an image
    folder: every image file under it, at any depth, in sorted order."""
    path = Path(str(data))
    if path.is_dir() and not (path / "manifest.json").is_file():
        return _folder(path)
    from selfclust.data.shardset import ShardSet

    shards = ShardSet.open(str(data))
    assert shards.first_idx is not None
    units = list(zip(shards.urls, shards.first_idx, shards.counts, strict=True))
    return Inputs("shards", shards.root, units, shards.num_samples, shards.timeout_s)


def _folder(root: Path) -> Inputs:
    from selfclust.shards.file_sources import readable_extensions

    exts = readable_extensions()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root))
    images = [p for p in files if p.suffix.lower() in exts]
    if not images:
        raise AssignError(
            f"{root} holds no image files (and no manifest.json): give a folder of images "
            f"({', '.join(sorted(exts)[:6])}, ...) or a shard set written by `selfclust shard`"
        )
    units = [(p.relative_to(root).as_posix(), i) for i, p in enumerate(images)]
    return Inputs("folder", str(root), units, len(images), ignored=len(files) - len(images))


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


class _Images(torch.utils.data.IterableDataset):
    """(key, order, uint8 [C, side, side] or None, why) for this rank's units, the units
    split again over the loader's workers."""

    def __init__(self, inputs: Inputs, units: list, channels: int, side: int) -> None:
        self.inputs, self.units, self.channels, self.side = inputs, units, channels, side
        self.stats = DataStats()

    def __iter__(self) -> Iterator[tuple[str, int, torch.Tensor | None, str]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for unit in self.units[wid::nw]:
            for key, order, data, why in self._raw(unit):
                image, why = self._decode(data) if data is not None else (None, why)
                yield key, order, image, why
        if self.stats.bad_shards:  # after the unit's samples: the shards cut short
            for url, why in self.stats.bad_shards.items():
                yield url, -1, None, f"shard not read to its end: {why}"

    def _raw(self, unit: tuple) -> Iterator[tuple[str, int, bytes | None, str]]:
        if self.inputs.kind == "folder":
            rel, order = unit
            try:
                yield rel, order, (Path(self.inputs.root) / rel).read_bytes(), ""
            except OSError as e:
                yield rel, order, None, f"{type(e).__name__}: {e.strerror or e}"
            return
        url, first, count = unit
        for s in read_shard(url, self.stats, first, count, timeout_s=self.inputs.timeout_s):
            idx = int(s["idx"]) if "idx" in s else int(s["__key__"])
            try:
                yield s["__key__"], idx, image_field(s), ""
            except ValueError as e:
                yield s["__key__"], idx, None, str(e)

    def _decode(self, data: bytes) -> tuple[torch.Tensor | None, str]:
        try:
            im = open_image(data, self.channels, (self.side, self.side))
            if im.size != (self.side, self.side):
                im = im.resize((self.side, self.side), Image.Resampling.BILINEAR)
            arr = np.asarray(im)
        except IMAGE_ERRORS as e:
            why = str(e).split(" <_io.")[0]  # Pillow names the BytesIO it read from
            return None, f"not a readable image ({type(e).__name__}: {why})"
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), ""


def _collate(items: list) -> list:
    return items


def assign_rank(
    rank: int, world: int, export: dict[str, Any], inputs: Inputs, opts: dict[str, Any]
) -> dict[str, Any]:
    """This rank's part: orders, keys, cluster ids and probabilities ``[T, n]``, skips."""
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    model = model_from_export(export).to(device)
    spec = export["preprocess"]
    side = opts["image_size"] or spec["image_size"]
    data = _Images(inputs, inputs.units[rank::world], spec["channels"], side)
    nw = opts["loader_workers"] if data.units else 0
    loader = torch.utils.data.DataLoader(
        data, batch_size=opts["batch_size"], num_workers=nw, collate_fn=_collate
    )
    keys, orders, ids, probs, skipped = [], [], [], [], []
    for batch in loader:
        good = [b for b in batch if b[2] is not None]
        skipped += [(k, why) for k, _, image, why in batch if image is None]
        if not good:
            continue
        x = model.backbone.preprocess(torch.stack([b[2] for b in good]).to(device))
        i, p = model.assign(x)
        ids.append(i.cpu())
        probs.append(p.float().cpu())
        keys += [b[0] for b in good]
        orders += [b[1] for b in good]
    t = len(model.heads)
    return {
        "keys": keys,
        "order": np.asarray(orders, dtype=np.int64),
        "ids": torch.cat(ids, 1).numpy() if ids else np.zeros((t, 0), np.int64),
        "probs": torch.cat(probs, 1).numpy() if probs else np.zeros((t, 0), np.float32),
        "skipped": skipped,
    }


def resolve_workers(workers: int | str, num_images: int, units: int, gpus: int) -> int:
    """``auto``: one rank per visible GPU above :data:`AUTO_MIN_IMAGES` images, else one;
    never more ranks than shards (or files)."""
    if workers == "auto":
        n = gpus if gpus > 1 and num_images > AUTO_MIN_IMAGES else 1
    elif isinstance(workers, str) or workers < 1:
        raise AssignError(f"--workers takes 'auto' or a count >= 1, got {workers!r}")
    else:
        n = workers
    return max(1, min(n, units))


def _rank_main(rank: int, world: int, tmp: str, args: tuple) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    part = assign_rank(rank, world, *args)
    torch.save(part, Path(tmp) / f"part-{rank}.pt")


def _run(world: int, export: dict, inputs: Inputs, opts: dict) -> list[dict[str, Any]]:
    if world == 1:
        return [assign_rank(0, 1, export, inputs, opts)]
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="selfclust-assign-") as tmp:
        # A rank that fails makes start_processes end the others and raise: none waits forever.
        mp.start_processes(
            _rank_main, args=(world, tmp, (export, inputs, opts)), nprocs=world,
            start_method="spawn",
        )  # fmt: skip
        return [torch.load(Path(tmp) / f"part-{r}.pt", weights_only=False) for r in range(world)]


def _load(target: str | Path) -> dict[str, Any]:
    return read_export(target) if Path(target).is_file() else export_state(target)


def assign(
    target: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    heads: str = "best",
    batch_size: int = 256,
    workers: int | str = "auto",
    image_size: int | None = None,
    loader_workers: int | None = None,
) -> dict[str, Any]:
    """Assign every image of ``data``; write ``out`` (``.csv`` or ``.parquet``) and, when
    some were skipped, ``out.skipped.csv``. Returns what was done, for the CLI to print."""
    out = Path(out)
    if out.suffix not in (".csv", ".parquet"):
        raise AssignError(f"--out {out}: name a .csv or a .parquet file")
    export = _load(target)
    if image_size is None and export["preprocess"]["image_size"] is None:
        raise AssignError(
            "the model was trained on the shards' own image size, which its export does not "
            "record: give --image-size (the side its training images had)"
        )
    inputs = open_inputs(data)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = resolve_workers(workers, inputs.num_images, len(inputs.units), gpus)
    if loader_workers is None:
        loader_workers = max(0, min(8, (os.cpu_count() or 1) // world - 1))
    opts = dict(batch_size=batch_size, image_size=image_size, loader_workers=loader_workers)
    parts = _run(world, export, inputs, opts)
    chosen = _heads(heads, export)
    rows = _merge(parts)
    from selfclust.assign_output import write_assignments, write_skipped

    write_assignments(out, rows, chosen)
    skipped = [s for p in parts for s in p["skipped"]]
    skipped_file = write_skipped(out.with_name(out.name + SKIPPED_SUFFIX), skipped)
    return {
        "out": str(out),
        "assigned": len(rows["keys"]),
        "skipped": len(skipped),
        "skipped_file": skipped_file,
        "ignored": inputs.ignored,
        "heads": chosen,
        "best_head": int(export["best_head"]),
        "ranks": world,
        "kind": inputs.kind,
        "clusters_used": int(np.unique(rows["ids"][chosen[0]]).size),
    }


def _heads(heads: str, export: dict[str, Any]) -> list[int]:
    t = len(export["heads"]["weight"]) if export["method"] == "sela" else 1
    if heads == "best":
        return [int(export["best_head"])]
    if heads == "all":
        return list(range(t))
    try:
        chosen = [int(h) for h in heads.split(",")]
    except ValueError:
        chosen = [-1]
    if not all(0 <= h < t for h in chosen):
        raise AssignError(f"--heads {heads!r}: give best, all, or head numbers 0..{t - 1}")
    return chosen


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    order = np.concatenate([p["order"] for p in parts])
    keys = [k for p in parts for k in p["keys"]]
    ids = np.concatenate([p["ids"] for p in parts], 1)
    probs = np.concatenate([p["probs"] for p in parts], 1)
    perm = np.argsort(order, kind="stable")
    return {"keys": [keys[i] for i in perm], "ids": ids[:, perm], "probs": probs[:, perm]}
