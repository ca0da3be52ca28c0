"""Benchmark: one SeLa label update at ImageNet size on gloo ranks of this machine.

    python benchmarks/label_scale.py                    # N = 1,281,167, K = 1000, D = 512, 2 ranks
    python benchmarks/label_scale.py --ranks 1 2        # 1 rank beside 2
    python benchmarks/label_scale.py --n 200000         # quicker

Each rank holds its share of N simulated pooled features (a mixture of K Gaussians in D
dimensions, a linear head scaled to a median top-2 margin of 3 logits, as in
benchmarks/sinkhorn.py) and runs what ``Trainer.relabel`` runs after the embedding: per head
the logits (``method.sinkhorn_logits=auto``: stored on the CPU), the distributed Sinkhorn-Knopp
with SeLa's tolerance, then the all-gather of every rank's labels into its ``[T, N]`` bank.
Printed per rank: seconds of the update, and memory (peak resident set above what the process
held before its features, and the features themselves), beside what SeLa's reference code holds
for the same step: the whole ``N × K`` float64 probability matrix in one process.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from selfclust.collectives import WORLD  # noqa: E402
from selfclust.labels.bank import LabelBank  # noqa: E402
from selfclust.labels.label_pass import gather_bank  # noqa: E402
from selfclust.labels.refine import RefinePlan, heads_to_centres  # noqa: E402
from selfclust.labels.sinkhorn import sinkhorn_labels  # noqa: E402
from selfclust.methods.sela import (  # noqa: E402
    KMEANS_RESTARTS,
    SINKHORN_MAX_ITERS,
    SINKHORN_TOL,
)
from selfclust.recipe import ALL_SAMPLES_UP_TO, SAMPLES_PER_CLUSTER  # noqa: E402

LAM = 25.0  # SeLa's λ (method.lam's default)


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def features(n: int, d: int, k: int, lo: int, hi: int) -> torch.Tensor:
    """Rows lo..hi of the N simulated features (the same rows whatever the rank count)."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(k, d, generator=g)
    sizes = torch.rand(k, generator=g) * 0.4 + 0.8
    out = torch.empty(hi - lo, d)
    for at in range(lo, hi, 65536):  # in blocks, each from its own seed
        end = min(hi, at + 65536)
        gb = torch.Generator().manual_seed(1 + at)
        cls = torch.multinomial(sizes / sizes.sum(), end - at, replacement=True, generator=gb)
        out[at - lo : end - lo] = centers[cls] + 0.5 * torch.randn(end - at, d, generator=gb)
    return out


def heads(t: int, k: int, d: int, calib: torch.Tensor) -> torch.nn.ModuleList:
    """``t`` random linear heads, each scaled to a median top-2 margin of 3 on ``calib``."""
    out = torch.nn.ModuleList()
    for h in range(t):
        g = torch.Generator().manual_seed(100 + h)
        lin = torch.nn.Linear(d, k)
        with torch.no_grad():
            w = torch.randn(k, d, generator=g) / math.sqrt(d)
            top = (calib @ w.t()).topk(2, dim=1).values
            lin.weight.copy_(w * (3.0 / (top[:, 0] - top[:, 1]).median()))
            lin.bias.zero_()
        out.append(lin)
    return out


def _rank(rank: int, world: int, tmp: str, n: int, k: int, d: int, t: int, refine: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rv", rank=rank, world_size=world)
    lo, hi = rank * n // world, (rank + 1) * n // world
    base = rss()
    x = features(n, d, k, lo, hi)
    idx = torch.arange(lo, hi)
    hs = heads(t, k, d, features(n, d, k, 0, min(n, 20_000)))
    bank = LabelBank(t, n, k)
    after_features = rss()
    dist.barrier()
    t0 = time.perf_counter()
    t_refine = 0.0
    if refine:  # method.relabel_heads=kmeans: heads re-set to centres, from their predictions
        current = torch.stack([h(x).argmax(1) for h in hs]) if len(x) else idx[None, :0]
        samples = max(ALL_SAMPLES_UP_TO, SAMPLES_PER_CLUSTER * k)
        plan = RefinePlan(k, KMEANS_RESTARTS, samples, n, seed=0)
        with torch.no_grad():
            heads_to_centres(hs, x, idx, current, plan, WORLD)
        t_refine = time.perf_counter() - t0
    local, st = sinkhorn_labels(hs, x, LAM, SINKHORN_TOL, SINKHORN_MAX_ITERS, group=WORLD)
    t_sk = time.perf_counter() - t0 - t_refine
    changed = bank.assign(gather_bank(local, idx, n, group=WORLD, fill=bank.labels))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sizes = bank.cluster_sizes()
    torch.save(
        {
            "seconds": seconds,
            "sinkhorn_seconds": t_sk,
            "refine_seconds": t_refine,
            "iters": max(st.iterations),
            "rows": hi - lo,
            "features": after_features - base,
            "peak_above": peak - base,
            "changed": changed,
            "sizes": (int(sizes.min()), int(sizes.max())),
        },
        f"{tmp}/r{rank}.pt",
    )
    dist.destroy_process_group()


def run(world: int, n: int, k: int, d: int, t: int, refine: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _rank, args=(world, tmp, n, k, d, t, refine), nprocs=world, start_method="spawn"
        )
        return [torch.load(f"{tmp}/r{r}.pt") for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1_281_167)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--d", type=int, default=512, help="feature dimension (ResNet-18: 512)")
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2])
    ap.add_argument(
        "--relabel-heads",
        choices=["keep", "kmeans"],
        default="keep",
        help="kmeans: first re-set the heads to k-means centres (method.relabel_heads=kmeans)",
    )
    args = ap.parse_args()
    n, k, d, t = args.n, args.k, args.d, args.heads
    gib = 2**30
    print(
        f"N={n} K={k} D={d} T={t}, λ={LAM}, gloo ranks on one machine ({os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f})\n"
    )
    print(
        "| ranks | rank | rows | update s | of which k-means s | of which Sinkhorn s | iterations "
        "| features GiB | peak above start GiB | cluster sizes |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    for world in args.ranks:
        for r, o in enumerate(run(world, n, k, d, t, args.relabel_heads == "kmeans")):
            print(
                f"| {world} | {r} | {o['rows']} | {o['seconds']:.1f} | {o['refine_seconds']:.1f} "
                f"| {o['sinkhorn_seconds']:.1f} "
                f"| {o['iters']} | {o['features'] / gib:.2f} | {o['peak_above'] / gib:.2f} "
                f"| {o['sizes'][0]}–{o['sizes'][1]} |"
            )
    print(
        f"\nSeLa's reference code: the N × K float64 probabilities in one process, "
        f"{n * k * 8 / gib:.1f} GiB per head, beside the features ({n * d * 4 / gib:.1f} GiB "
        f"float32 at D={d}); selfclust per rank: its rows' features plus two n_r × K float32 "
        f"blocks ({2 * n * k * 4 / max(args.ranks) / gib:.1f} GiB at {max(args.ranks)} ranks) "
        f"and the int16 bank ({t * n * 2 / gib:.3f} GiB)."
    )


if __name__ == "__main__":
    main()
