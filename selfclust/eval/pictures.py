"""Pictures of a run's clusters: a gallery of each cluster's most confident images, the
cluster-size histogram and the confusion matrix against ground truth.

Written as PNGs into the run dir (``gallery.png``, ``cluster_sizes.png``, ``confusion.png``)
and logged as images to the run's own W&B run (its id from ``run.json``, ``resume="allow"``,
the mode from the run's ``config.yaml``). They show the head chosen without ground truth (the
lowest training loss), on the run's evaluation shards (else its training shards). Only the
first ``max_samples`` samples are scored, so a huge set costs one bounded CPU pass.
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
from selfclust.eval.metrics import cluster_accuracy, matched_confusion
from selfclust.models.selflabel import SelfLabelNet

GALLERY, SIZES, CONFUSION = "gallery.png", "cluster_sizes.png", "confusion.png"


@dataclass
class Assignments:
    idx: np.ndarray  # [n] global sample index
    cls: np.ndarray  # [n] class, -1 unknown
    pred: np.ndarray  # [n] cluster of the chosen head
    conf: np.ndarray  # [n] softmax probability of that cluster
    total: int  # samples in the shard set (n may be fewer: max_samples)


@torch.no_grad()
def assign(
    model: SelfLabelNet,
    shards: ShardSet,
    head: int,
    image_size: int | None,
    max_samples: int,
    batch_size: int = 512,
) -> Assignments:
    """One pass (this process, no ranks) over the first ``max_samples`` samples."""
    model.eval()
    idx, cls, pred, conf = [], [], [], []
    batches = eval_batches(shards, 0, 1, batch_size, image_size=image_size)
    for images, i, c in itertools.islice(batches, -(-max_samples // batch_size)):
        p = torch.softmax(model(normalize(images, image_size)).logits[head].float(), 1)
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


def _class_name(names: list[str] | None, c: int) -> str:
    return names[c] if names and 0 <= c < len(names) else str(c)


def _figure(width: float, height: float):  # noqa: ANN202 (matplotlib types are loose)
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=110)


def gallery(
    a: Assignments,
    images: dict[int, np.ndarray],
    tiles: dict[int, np.ndarray],
    clusters: int,
    per_cluster: int,
    names: list[str] | None,
    title: str,
    path: Path,
) -> None:
    """One row per shown cluster: its most confident images, left to right, and a label with
    its size and (with ground truth) its dominant class and that class's share."""
    plt, fig = _figure(1.6 + 0.62 * per_cluster, 0.9 + 0.66 * len(tiles))
    sizes = np.bincount(a.pred, minlength=clusters)
    # grey levels scaled to the brightest pixel shown: some sets store 0..16, not 0..255
    top = max([int(im.max()) for im in images.values()] + [1])
    grid = fig.add_gridspec(len(tiles), per_cluster + 1, width_ratios=[2.6] + [1] * per_cluster)
    for r, (k, idx) in enumerate(tiles.items()):
        text = f"cluster {k}\n{sizes[k]:,} images"
        members = a.cls[a.pred == k]
        if len(members) and (members >= 0).all():
            dom = np.bincount(members).argmax()
            share = (members == dom).mean()
            text += f"\nmostly {_class_name(names, int(dom))} ({share:.0%})"
        ax = fig.add_subplot(grid[r, 0])
        ax.axis("off")
        ax.text(0.0, 0.5, text, va="center", ha="left", fontsize=8.5, transform=ax.transAxes)
        for j in range(per_cluster):
            ax = fig.add_subplot(grid[r, j + 1])
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(idx):
                im = images[int(idx[j])]
                gray = im.shape[2] == 1
                ax.imshow(
                    im[:, :, 0] if gray else im, cmap="gray" if gray else None, vmin=0, vmax=top
                )
            else:
                ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(
        left=0.01,
        right=0.99,
        bottom=0.01,
        top=1 - 0.5 / fig.get_figheight(),
        wspace=0.06,
        hspace=0.08,
    )
    fig.savefig(path)
    plt.close(fig)


def size_histogram(a: Assignments, clusters: int, title: str, path: Path) -> None:
    """Cluster sizes, largest first (K ≤ 100), or a histogram of sizes; the dashed line is
    the equal-size target N/K that the Sinkhorn constraint aims for."""
    plt, fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    sizes = np.bincount(a.pred, minlength=clusters)
    target = len(a.pred) / clusters
    if clusters <= 100:
        order = np.argsort(-sizes, kind="stable")
        ax.bar(range(clusters), sizes[order], color="#4c72b0")
        ax.axhline(target, ls="--", color="k", lw=1, label=f"N/K = {target:,.0f}")
        ax.set_xticks(range(clusters), [str(k) for k in order], fontsize=7 if clusters > 30 else 9)
        ax.set_xlabel("cluster (largest first)")
        ax.set_ylabel("images")
    else:
        ax.hist(sizes, bins=50, color="#4c72b0")
        ax.axvline(target, ls="--", color="k", lw=1, label=f"N/K = {target:,.0f}")
        ax.set_xlabel("cluster size (images)")
        ax.set_ylabel("clusters")
    ax.legend(fontsize=8)
    ax.set_title(
        f"{title}\nmin {sizes.min():,}  max {sizes.max():,}  empty {int((sizes == 0).sum())}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def confusion(
    a: Assignments, clusters: int, names: list[str] | None, title: str, path: Path
) -> None:
    """True class × cluster, each row normalised to the class's images; columns in
    Hungarian-matched order (so a perfect clustering is a diagonal); counts written in."""
    counts, classes, order = matched_confusion(a.cls, a.pred, clusters)
    shown = min(clusters, 60)  # beyond that, columns are unreadable: keep the matched ones
    counts, order = counts[:, :shown], order[:shown]
    frac = counts / np.maximum(1, np.bincount(np.searchsorted(classes, a.cls)))[:, None]
    plt, fig = _figure(1.8 + 0.42 * shown, 1.5 + 0.4 * len(classes))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    if shown * len(classes) <= 900:
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(
                    j,
                    i,
                    str(n),
                    ha="center",
                    va="center",
                    fontsize=8 if counts.size <= 200 else 6.5,
                    color="white" if frac[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(shown), [str(k) for k in order], fontsize=8)
    ax.set_yticks(range(len(classes)), [_class_name(names, int(c)) for c in classes], fontsize=8)
    ax.set_xlabel("cluster (matched to classes by the Hungarian algorithm)")
    ax.set_ylabel("true class")
    more = f", first {shown} of {clusters} clusters" if shown < clusters else ""
    acc = cluster_accuracy(a.cls, a.pred)
    ax.set_title(f"{title}\nACC {acc:.3f}{more}; colour: share of the class's images", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
        a,
        images,
        tiles,
        clusters,
        per_cluster,
        shards.classes,
        f"most confident images per cluster, {what}{more}",
        paths["gallery"],
    )
    size_histogram(a, clusters, f"cluster sizes, {what}", paths["cluster_sizes"])
    if labelled:
        paths["confusion"] = out_dir / CONFUSION
        confusion(a, clusters, shards.classes, f"confusion matrix, {what}", paths["confusion"])
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
    max_samples: int = 100_000,
    wandb_log: bool = True,
) -> dict[str, Any]:
    """Pictures of a finished (or checkpointed) run, written into ``run_dir``."""
    from selfclust.eval.evaluate import load_run
    from selfclust.eval.scoring import best_head

    run_dir = Path(run_dir)
    model, cfg, ckpt, state = load_run(run_dir, data)
    shards = ShardSet.open(data or cfg.data.eval or cfg.data.train, cfg.data.io_timeout_s)
    head = best_head(state["extra"].get("head_loss"))
    a = assign(model, shards, head, cfg.data.image_size, max_samples)
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
