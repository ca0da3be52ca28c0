"""The three figures of a run's clusters, laid out with matplotlib and saved as PNGs: the
gallery (one row of images per cluster), the cluster-size chart and the confusion matrix.

Each takes the assignments as arrays (``pred``: [n] cluster, ``cls``: [n] class, -1 unknown)
and writes one file; which samples, clusters and titles are shown is chosen by
:mod:`selfclust.eval.pictures`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from selfclust.eval.metrics import cluster_accuracy, matched_confusion


def _class_name(names: list[str] | None, c: int) -> str:
    return names[c] if names and 0 <= c < len(names) else str(c)


def _figure(width: float, height: float):  # noqa: ANN202 (matplotlib types are loose)
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=110)


def gallery(
    pred: np.ndarray,
    cls: np.ndarray,
    images: dict[int, np.ndarray],
    tiles: dict[int, np.ndarray],
    clusters: int,
    per_cluster: int,
    names: list[str] | None,
    title: str,
    path: Path,
) -> None:
    """One row per shown cluster: its most confident images, left to right, and a label with
    its size and (with ground truth) its dominant class and that class's share.

    ``tiles``: cluster → global indices of its images, best first (the rows, in order);
    ``images``: global index → uint8 ``[H, W, C]``."""
    plt, fig = _figure(1.6 + 0.62 * per_cluster, 0.9 + 0.66 * len(tiles))
    sizes = np.bincount(pred, minlength=clusters)
    # grey levels scaled to the brightest pixel shown: some sets store 0..16, not 0..255
    top = max([int(im.max()) for im in images.values()] + [1])
    grid = fig.add_gridspec(len(tiles), per_cluster + 1, width_ratios=[2.6] + [1] * per_cluster)
    for r, (k, idx) in enumerate(tiles.items()):
        text = f"cluster {k}\n{sizes[k]:,} images"
        members = cls[pred == k]
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


def size_histogram(pred: np.ndarray, clusters: int, title: str, path: Path) -> None:
    """Cluster sizes, largest first (K ≤ 100), or a histogram of sizes; the dashed line is
    the equal-size target N/K that the Sinkhorn constraint aims for."""
    plt, fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    sizes = np.bincount(pred, minlength=clusters)
    target = len(pred) / clusters
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
    cls: np.ndarray,
    pred: np.ndarray,
    clusters: int,
    names: list[str] | None,
    title: str,
    path: Path,
) -> None:
    """True class × cluster, each row normalised to the class's images; columns in
    Hungarian-matched order (so a perfect clustering is a diagonal); counts written in."""
    counts, classes, order = matched_confusion(cls, pred, clusters)
    shown = min(clusters, 60)  # beyond that, columns are unreadable: keep the matched ones
    counts, order = counts[:, :shown], order[:shown]
    frac = counts / np.maximum(1, np.bincount(np.searchsorted(classes, cls)))[:, None]
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
    acc = cluster_accuracy(cls, pred)
    ax.set_title(f"{title}\nACC {acc:.3f}{more}; colour: share of the class's images", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
