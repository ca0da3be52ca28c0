"""Raw-pixel k-means beside a run's clustering: the baseline the results table puts each row
next to, measured on the same shards and scored the same way (ACC/NMI/ARI on every sample).

    python benchmarks/pixel_kmeans.py SHARDS --clusters K [--seeds 0 1 2] [--redo 5] [--raw]

k-means (faiss) on the pixels of every image (each image standardised, or with ``--raw`` in
0..1 as they are), the best of ``--redo`` runs by
objective for each seed (no labels used to choose); prints each seed and the mean ± std.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from selfclust.data.shardset import ShardSet
from selfclust.data.streams import eval_batches
from selfclust.eval.metrics import clustering_scores
from selfclust.labels.kmeans import _faiss


def pixels(spec: str, raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every image of the shards as float32 rows (each standardised, or 0..1 with ``raw``),
    with its class."""
    xs, ys = [], []
    for images, _, cls in eval_batches(ShardSet.open(spec), 0, 1, 512):
        x = images.flatten(1).float() / 255
        if not raw:
            x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-6)
        xs.append(x)
        ys.append(cls)
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("shards")
    p.add_argument("--clusters", type=int, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--redo", type=int, default=5)
    p.add_argument("--raw", action="store_true", help="pixels in 0..1 as they are, unstandardised")
    a = p.parse_args()
    x, y = pixels(a.shards, a.raw)
    faiss = _faiss()
    rows = []
    for seed in a.seeds:
        km = faiss.Kmeans(x.shape[1], a.clusters, niter=50, nredo=a.redo, seed=seed)
        km.train(np.ascontiguousarray(x))
        pred = km.index.search(x, 1)[1][:, 0]
        s = clustering_scores(y, pred)
        rows.append((s["acc"], s["nmi"], s["ari"]))
        print(f"seed {seed}: ACC {s['acc']:.3f}  NMI {s['nmi']:.3f}  ARI {s['ari']:.3f}")
    m, sd = np.mean(rows, 0), np.std(rows, 0, ddof=1) if len(rows) > 1 else np.zeros(3)
    print(f"pixel k-means, {len(y)} images, K={a.clusters}: ACC {m[0]:.3f} ± {sd[0]:.3f}  "
          f"NMI {m[1]:.3f} ± {sd[1]:.3f}  ARI {m[2]:.3f} ± {sd[2]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
