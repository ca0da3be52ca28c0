"""Benchmark: faiss k-means (selfclust's default) vs sklearn KMeans vs selfclust's torch
fallback on the same data, two ways, one run:

1. as each is called by default: ``selfclust.labels.kmeans.kmeans(x, k)`` (faiss, random start,
   ``LLOYD_ITERS`` = 25 Lloyd iterations, every k-means selfclust runs), the same with the
   library's early stop (``tol=``) and with an AFK-MC² start (``seeding=``), against
   ``sklearn.cluster.KMeans(k)`` with its defaults (k-means++ start, one run, Lloyd until the
   centre shift is under tol=1e-4, at most 300 iterations): time and objective;
2. equal work: same starting centroids, same number of Lloyd iterations.

    python benchmarks/kmeans.py                  # 100k × 256 → 1000 clusters, 20 iterations
    python benchmarks/kmeans.py --n 20000 --k 200
    python benchmarks/kmeans.py --gpu            # torch-cuda (and faiss-gpu if installed)

Data: real-ish, not Gaussian blobs. The 10,000 MNIST test digits (selfclust's built-in copy),
each also shifted by up to 2 pixels to make N samples, projected to D dimensions by PCA fitted
on the originals: digit structure at the issue's size (no 100k-image set ships with the project).

Fairness (table 2): every method starts from the same k random points and runs exactly
--iters Lloyd iterations (sklearn: ``init=<those points>, n_init=1, tol=0,
algorithm="lloyd"``; faiss: ``max_points_per_centroid=N`` so it does not subsample to k·256
points, ``init_centroids``);
threads: faiss and sklearn/BLAS (threadpoolctl) and torch all get --threads. The objective
Σ min_k ||x − c_k||² of each result is computed by the same function.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from selfclust.labels.kmeans import faiss_gpus, kmeans, kmeans_torch, objective  # noqa: E402

MNIST = ROOT / "selfclust" / "datasets" / "mnist_test" / "t10k-images-idx3-ubyte.gz"  # built in


def mnist_features(n: int, d: int, seed: int) -> torch.Tensor:
    """[n, d] float32: MNIST test digits and shifted copies, PCA-projected (see module doc)."""
    raw = gzip.open(MNIST).read()
    img = torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(-1, 28, 28).float()
    g = torch.Generator().manual_seed(seed)
    copies = [img]
    while sum(len(c) for c in copies) < n:
        dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
        copies.append(torch.roll(img, shifts=(dy, dx), dims=(1, 2)))
    x = torch.cat(copies)[:n].flatten(1) / 255.0  # [n, 784]
    mean = img.flatten(1).mean(0) / 255.0
    # exact PCA (pca_lowrank draws from torch's global RNG: the data changed between runs)
    v = torch.linalg.svd(img.flatten(1) / 255.0 - mean, full_matrices=False)[2].t()
    return ((x - mean) @ v[:, :d]).contiguous()


def timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def defaults_table(x: torch.Tensor, args: argparse.Namespace) -> None:
    """Table 1: each library as it is called by default (see the module doc), and selfclust
    with the early stop (``tol=``) and with the AFK-MC² start (``seeding=``)."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    calls = [
        (f"`kmeans(x, {args.k})`", {}),
        (f"`kmeans(x, {args.k}, tol={args.tol:g})`", {"tol": args.tol}),
        (f'`kmeans(x, {args.k}, seeding="afkmc2")`', {"seeding": "afkmc2"}),
    ]
    ours = []
    for name, kw in calls:
        res, t = timed(
            lambda kw=kw: kmeans(x, args.k, niter=args.default_iters, seed=args.seed, **kw)
        )
        ours.append((f"{name} ({res.backend})", kw.get("seeding", "random"), res, t))
    sk = KMeans(args.k, random_state=args.seed)
    with threadpool_limits(args.threads):
        _, t_sk = timed(lambda: sk.fit(x.numpy()))
    sk_obj = objective(x, torch.from_numpy(sk.cluster_centers_))
    print(f"as called by default (load average now {os.getloadavg()[0]:.2f})\n")
    print("| call | start | Lloyd iterations | seconds | objective ÷ sklearn's | sklearn time ÷ |")
    print("|---|---|---|---|---|---|")
    for name, start, res, t in ours:
        print(
            f"| {name} | {start} | {res.iterations} | {t:.2f} | "
            f"{res.objective / sk_obj:.5f} | **{t_sk / t:.1f}×** |"
        )
    print(
        f"| `sklearn.cluster.KMeans({args.k})` | k-means++ | {sk.n_iter_} (tol 1e-4) | "
        f"{t_sk:.2f} | 1.00000 | 1.0× |\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--skip-defaults", action="store_true", help="only the equal-work table")
    ap.add_argument("--default-iters", type=int, default=25, help="selfclust's LLOYD_ITERS")
    ap.add_argument("--tol", type=float, default=1e-3, help="the early-stop row's tol")
    ap.add_argument("--gpu", action="store_true", help="also run on the CUDA device")
    args = ap.parse_args()

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    x = mnist_features(args.n, args.d, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    init = x[torch.randperm(args.n, generator=g)[: args.k]].clone()
    xs, init_np = x.numpy(), init.numpy()
    print(
        f"N={args.n} D={args.d} K={args.k}, {args.iters} Lloyd iterations, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}\n"
    )
    if not args.skip_defaults:
        defaults_table(x, args)
    rows: list[tuple[str, float, float]] = []

    def faiss_run(gpu: bool) -> np.ndarray:
        km = faiss.Kmeans(
            args.d,
            args.k,
            niter=args.iters,
            seed=args.seed,
            gpu=gpu,
            max_points_per_centroid=args.n,
        )
        km.train(xs, init_centroids=init_np)
        assert km.centroids is not None
        return km.centroids

    c, t = timed(lambda: faiss_run(False))
    rows.append(("faiss-cpu", t, objective(x, torch.from_numpy(c))))
    if not args.skip_sklearn:
        sk = KMeans(args.k, init=init_np, n_init=1, max_iter=args.iters, tol=0, algorithm="lloyd")
        with threadpool_limits(args.threads):
            _, t = timed(lambda: sk.fit(xs))
        rows.append(
            (
                f"sklearn KMeans ({sk.n_iter_} it.)",
                t,
                objective(x, torch.from_numpy(sk.cluster_centers_)),
            )
        )
    c_t, t = timed(lambda: kmeans_torch(x, args.k, args.iters, init=init)[0])
    rows.append(("selfclust torch fallback (cpu)", t, objective(x, c_t)))
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device (none found)")
        xg = x.cuda()
        kmeans_torch(xg[: args.k * 4], args.k, 1)  # CUDA context and kernels warm
        c_g, t = timed(lambda: kmeans_torch(xg, args.k, args.iters, init=init)[0])
        rows.append(("selfclust torch fallback (cuda)", t, objective(x, c_g.cpu())))
        if faiss_gpus() > 0:
            c, t = timed(lambda: faiss_run(True))
            rows.append(("faiss-gpu", t, objective(x, torch.from_numpy(c))))
    base_t, base_obj = rows[0][1], rows[0][2]
    print(f"equal work: same start, {args.iters} Lloyd iterations each\n")
    print("| method | seconds | × faiss-cpu time | objective | ÷ faiss-cpu objective |")
    print("|---|---|---|---|---|")
    for name, t, obj in rows:
        print(f"| {name} | {t:.2f} | {t / base_t:.2f} | {obj:.6g} | {obj / base_obj:.5f} |")


if __name__ == "__main__":
    main()
