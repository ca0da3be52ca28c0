"""Pictures of a run's clusters: a gallery of each cluster's most confident images, the
cluster-size histogram and the confusion matrix against ground truth.

Written as PNGs into the run dir (``gallery.png``, ``cluster_sizes.png``, ``confusion.png``)
and logged as images to the run's own W&B run (its id from ``run.json``, ``resume="allow"``,
the mode from the run's ``config.yaml``). They show the head chosen without ground truth (the
lowest training loss), on the run's evaluation shards (else its training shards). Only the
first samples are scored (:func:`picture_samples`: fewer for larger images), on the driver's
GPU when it has one, so a huge set costs one bounded pass (ImageNet on a CPU head: minutes).

This module chooses what is shown (the samples scored, the clusters and tiles, the titles) and
where it goes; :mod:`selfclust.eval.figures` lays out and saves each figure.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfclust.data.augment import normalize
from selfclust.data.shardset import ShardSet
from selfclust.data.streams import eval_batches
from selfclust.eval.figures import confusion, gallery, size_histogram
from selfclust.eval.metrics import matched_confusion
from selfclust.models.selflabel import SelfLabelNet

GALLERY, SIZES, CONFUSION = "gallery.png", "cluster_sizes.png", "confusion.png"


@dataclass
class Assignments:
    idx: np.ndarray  # [n] global sample index
    cls: np.ndarray  # [n] class, -1 unknown
    pred: np.ndarray  # [n] cluster of the chosen head
    conf: np.ndarray  # [n] softmax probability of that cluster
    total: int  # samples in the shard set (n may be fewer: max_samples)


def picture_samples(side: int | None) -> int:
    """How many samples the pictures score: 100,000 images of up to 32 px, and as many pixels
    for larger ones (a pass of bounded cost), but at least 10,000 (ImageNet's 224 px)."""
    if side is None or side <= 32:
        return 100_000
    return max(10_000, 100_000 * 32 * 32 // (side * side))


@torch.no_grad()
def assign(
    model: SelfLabelNet,
    shards: ShardSet,
    head: int,
    image_size: int | None,
    max_samples: int,
    batch_size: int = 512,
) -> Assignments:
    """One pass (this process, no ranks) over the first ``max_samples`` samples, on the
    model's device."""
    model.eval()
    device = next(model.parameters()).device
    idx, cls, pred, conf = [], [], [], []
    batches = eval_batches(shards, 0, 1, batch_size, image_size=image_size)
    for images, i, c in itertools.islice(batches, -(-max_samples // batch_size)):
        x = normalize(images.to(device), image_size)
        p = torch.softmax(model(x).logits[head].float(), 1).cpu()
        top = p.max(1)
        idx.append(i.numpy())
        cls.append(c.numpy())
        pred.append(top.indices.numpy())
        conf.append(top.values.numpy())
    i_, c_, p_, f_ = (np.concatenate(a)[:max_samples] for a in (idx, cls, pred, conf))
    return Assignments(i_, c_, p_, f_, total=shards.num_samples)


def chosen_tiles(a: Assignments, clusters: list[int], per_cluster: int) -> dict[int, np.ndarray]:
    """Global indices of each shown cluster's most confident samples (best first)."""
    out = {}
    for k in clusters:
        members = np.flatnonzero(a.pred == k)
        best = members[np.argsort(-a.conf[members], kind="stable")[:per_cluster]]
        out[k] = a.idx[best]
    return out


def fetch_images(
    shards: ShardSet, wanted: set[int], image_size: int | None, batch_size: int = 512
) -> dict[int, np.ndarray]:
    """uint8 ``[H, W, C]`` images of the ``wanted`` global indices (a second read pass)."""
    found: dict[int, np.ndarray] = {}
    for images, idx, _ in eval_batches(shards, 0, 1, batch_size, image_size=image_size):
        for j in np.flatnonzero(np.isin(idx.numpy(), list(wanted))):
            found[int(idx[j])] = images[j].permute(1, 2, 0).numpy()
        if len(found) == len(wanted):
            break
    return found


def draw(
    a: Assignments,
    shards: ShardSet,
    out_dir: Path,
    clusters: int,
    *,
    image_size: int | None,
    head: int,
    per_cluster: int = 10,
    max_clusters: int = 20,
) -> dict[str, Path]:
    """All pictures for one head's assignments; returns ``name → path``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = np.bincount(a.pred, minlength=clusters)
    labelled = bool((a.cls >= 0).all())
    if labelled:  # rows in matched order: cluster for class 0, class 1, ...
        _, _, order = matched_confusion(a.cls, a.pred, clusters)
        shown = [int(k) for k in order if sizes[k]][:max_clusters]
    else:
        shown = [int(k) for k in np.argsort(-sizes, kind="stable") if sizes[k]][:max_clusters]
    scope = (
        f"{len(a.pred):,} of {a.total:,} samples"
        if len(a.pred) < a.total
        else f"{a.total:,} samples"
    )
    what = f"head {head}, {scope}"
    tiles = chosen_tiles(a, shown, per_cluster)
    images = fetch_images(shards, {int(i) for t in tiles.values() for i in t}, image_size)
    more = (
        ""
        if len(shown) == int((sizes > 0).sum())
        else f" ({len(shown)} of {clusters} clusters shown)"
    )
    paths = {"gallery": out_dir / GALLERY, "cluster_sizes": out_dir / SIZES}
    gallery(
        a.pred,
        a.cls,
        images,
        tiles,
        clusters,
        per_cluster,
        shards.classes,
        f"most confident images per cluster, {what}{more}",
        paths["gallery"],
    )
    size_histogram(a.pred, clusters, f"cluster sizes, {what}", paths["cluster_sizes"])
    if labelled:
        paths["confusion"] = out_dir / CONFUSION
        confusion(
            a.cls, a.pred, clusters, shards.classes, f"confusion matrix, {what}", paths["confusion"]
        )
    return paths


def log_to_wandb(run_dir: Path, paths: dict[str, Path], step: int) -> str:
    """Log the PNGs to the run's W&B run (resumed by the id in ``run.json``); returns what was
    done, in words."""
    from selfclust.rundir import read_identity
    from selfclust.runlog import log_images

    info, cfg = read_identity(run_dir)
    return log_images(run_dir, cfg, info["wandb_id"], paths, step)


def run_pictures(
    run_dir: str | Path,
    *,
    data: str | None = None,
    per_cluster: int = 10,
    max_clusters: int = 20,
    max_samples: int | None = None,
    wandb_log: bool = True,
) -> dict[str, Any]:
    """Pictures of a finished (or checkpointed) run, written into ``run_dir``."""
    from selfclust.eval.evaluate import load_run
    from selfclust.eval.scoring import best_head

    run_dir = Path(run_dir)
    model, cfg, ckpt, state = load_run(run_dir, data)
    shards = ShardSet.open(data or cfg.data.eval or cfg.data.train, cfg.data.io_timeout_s)
    head = best_head(state["extra"].get("head_loss"))
    if torch.cuda.is_available():  # the driver's own GPU, where it has one
        model = model.cuda()
    side = cfg.data.image_size or (shards.image or {}).get("height")
    a = assign(model, shards, head, cfg.data.image_size, max_samples or picture_samples(side))
    paths = draw(
        a,
        shards,
        run_dir,
        cfg.method.clusters,
        image_size=cfg.data.image_size,
        head=head,
        per_cluster=per_cluster,
        max_clusters=max_clusters,
    )
    note = (
        log_to_wandb(run_dir, paths, int(state["position"]["global_step"]))
        if wandb_log
        else "not logged"
    )
    return {"paths": {k: str(p) for k, p in paths.items()}, "head": head, "wandb": note}
