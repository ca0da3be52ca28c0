"""Benchmark: selfclust's Sinkhorn vs a float64 numpy SeLa-style solver, the one-read floor,
and 2 gloo ranks vs 1, all measured in one run.

    python benchmarks/sinkhorn.py                      # N=100k, K=1000, λ=25: ~7 min on 2 cores
    python benchmarks/sinkhorn.py --skip-sela          # without the SeLa-style baseline: ~1 min
    python benchmarks/sinkhorn.py --n 20000 --k 500    # quicker
    python benchmarks/sinkhorn.py --gpu                # ImageNet size: N=1.28M, K=3000, 10 heads
    python benchmarks/sinkhorn.py --recompute 512      # stored vs recomputed logits (D=512)
    python benchmarks/sinkhorn.py --sets --threads 1   # 7 logit sets: iterations, kernel builds

``--recompute D``: a linear head on D-dimensional mixture features, solved with its logits
stored (``head_logits``) and recomputed from the features (:class:`LinearLogits`), each in a
fresh process: seconds and peak memory above the features (``ru_maxrss``), same labels.

CPU kernels: the per-iteration tables put the fused numba sweep (the default) beside the
torch/BLAS one (``SELFCLUST_SINKHORN_CPU=torch``), each vs one ``block.sum()``, for 1 and 2
threads (``--sweep-threads``); the whole solve is timed with both.

Simulated logits: a trained head's logits are low-rank and confident, so we draw features
from a mixture of ``--classes`` Gaussians (class sizes vary ±20 %), project them with a random
linear head and scale them to a median top-2 margin of ``--margin`` logits.

The SeLa-style baseline is written from the paper's description (Asano et al., ICLR 2020,
Sec. 3.1 and its appendix): P = softmax(z)^λ held densely in float64, alternating column and
row scaling, the change of the row scaling checked every 10 iterations against tol 0.1 (summed
over samples, as in the authors' release), labels = argmax of the scaled P.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import selfclust.labels.sinkhorn_kernels as kernels  # noqa: E402
from selfclust.labels.sinkhorn import LinearLogits, SinkhornResult, sinkhorn_knopp  # noqa: E402


def simulated_logits(
    n: int, k: int, classes: int, margin: float, seed: int, device: str = "cpu"
) -> torch.Tensor:
    """[n, k] float32 logits of a random linear head on mixture features (see module doc)."""
    g = torch.Generator(device=device).manual_seed(seed)
    d = 64
    sizes = torch.rand(classes, generator=g, device=device) * 0.4 + 0.8
    cls = torch.multinomial(sizes / sizes.sum(), n, replacement=True, generator=g)
    centers = torch.randn(classes, d, generator=g, device=device)
    w = torch.randn(d, k, generator=g, device=device) / math.sqrt(d)
    z = torch.empty(n, k, device=device)
    for s in range(0, n, 65536):  # chunks: no [n, d] temporary beyond one chunk
        c = cls[s : s + 65536]
        x = centers[c] + 0.5 * torch.randn(len(c), d, generator=g, device=device)
        torch.mm(x, w, out=z[s : s + 65536])
    top = z[: min(n, 100_000)].topk(2, dim=1).values
    return z.mul_(margin / (top[:, 0] - top[:, 1]).median())


def sela_numpy(
    z: np.ndarray, lam: float, tol: float = 0.1, max_iters: int | None = None
) -> tuple[np.ndarray, int, float]:
    """SeLa-style Sinkhorn (float64 numpy, dense P); returns (labels, iterations, column
    error max_k |K Σ_i Q_ik − 1| of its final plan, whose rows are exact). ``max_iters``
    stops it early (then the time is a lower bound for reaching tol)."""
    n, k = z.shape
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)  # softmax
    p **= lam  # P = softmax(z)^λ, float64, held densely
    r = np.ones(k) / k  # cluster scaling α
    c = np.ones(n) / n  # sample scaling β
    err, it = math.inf, 0
    while err > tol and (max_iters is None or it < max_iters):
        r = (1.0 / k) / (c @ p)
        c_new = (1.0 / n) / (p @ r)
        if it % 10 == 0:
            err = float(np.nansum(np.abs(c / c_new - 1)))
        c = c_new
        it += 1
    col_err = float(np.abs(k * r * (c @ p) - 1).max())
    return np.argmax(p * r[None, :], axis=1), it, col_err


def column_error_f64(z: torch.Tensor, lam: float, labels_alpha: torch.Tensor) -> float:
    """max_k |K Σ_i Q_ik − 1| of the plan with column scaling α and exact rows (float64)."""
    n, k = z.shape
    col = torch.zeros(k, dtype=torch.float64)
    for s in range(0, n, 16384):
        lq = lam * z[s : s + 16384].double() + labels_alpha[None, :]
        lq -= torch.logsumexp(lq, dim=1, keepdim=True) + math.log(n)
        col += lq.exp().sum(0)
    return float((col * k - 1).abs().max())


def best_of(fn: Any, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def per_iteration(z: torch.Tensor, lam: float, threads: int) -> dict[str, float]:
    """Seconds (best of 7) for one sweep of the kernel (rows, relaxation, column sums: what
    every iteration does), one with the convergence check's exact-row column sums, and one
    kernel build (done again whenever the scalings are absorbed), on the real kernel P of
    these logits. ``threads``: numba threads for the fused kernels, 0 for torch/BLAS."""
    n, k = z.shape
    z_max = z.amax(dim=1)
    la0 = torch.zeros(k, dtype=torch.float64, device=z.device)
    p = kernels._build_kernel(z, z_max, lam, la0, None, threads)[0]
    a = torch.ones(k, device=z.device)
    b = torch.full((n,), 1.0 / n, device=z.device)
    b_ex = torch.empty_like(b)

    def sweep(check: bool) -> None:
        kernels._sweep(p, a, b, b_ex, 1.0 / n, 1.5, check, threads)
        if z.is_cuda:
            torch.cuda.synchronize()

    out = {
        "sweep": best_of(lambda: sweep(False), repeat=7),
        "check": best_of(lambda: sweep(True), repeat=7),
        "build": best_of(lambda: kernels._build_kernel(z, z_max, lam, la0, p, threads), repeat=5),
    }
    if z.is_cuda:  # the build is not synchronised above
        del out["build"]
    return out


def solve(
    z: torch.Tensor, lam: float, kernel: str, repeat: int = 1
) -> tuple[SinkhornResult, float]:
    """Solves with SELFCLUST_SINKHORN_CPU=kernel; returns (result, best seconds of ``repeat``)."""
    before = os.environ.get(kernels._CPU_KERNEL_ENV)
    os.environ[kernels._CPU_KERNEL_ENV] = kernel
    try:
        best = math.inf
        for _ in range(repeat):
            t = time.perf_counter()
            res = sinkhorn_knopp(z, lam, group=None)
            best = min(best, time.perf_counter() - t)
        return res, best
    finally:
        if before is None:
            del os.environ[kernels._CPU_KERNEL_ENV]
        else:
            os.environ[kernels._CPU_KERNEL_ENV] = before


def sweep_table(z: torch.Tensor, lam: float, threads: int, solves: dict[str, Any]) -> None:
    """Per-iteration costs of both CPU kernels vs one read of the block, at ``threads``."""
    torch.set_num_threads(threads)
    t_read = best_of(lambda: z.sum(), repeat=7)  # z is a float32 [n, K] block like ours
    fused = per_iteration(z, lam, kernels._numba_threads(z))
    blas = per_iteration(z, lam, 0)
    n, k = z.shape

    def cells(t: float) -> str:
        return f"{1e3 * t:.1f} | {t / t_read:.2f}"

    print(
        f"\n| {threads} thread(s), load {os.getloadavg()[0]:.1f} | fused numba: ms | × read "
        f"| torch/BLAS: ms | × read |\n|---|---|---|---|---|\n"
        f"| `block.sum()` ({n}×{k} f32) | {cells(t_read)} | {cells(t_read)} |"
    )
    names = {
        "sweep": "one sweep (rows + columns, relaxed)",
        "check": "one sweep with convergence check",
        "build": "kernel build after an absorption (numba: with the first sweep)",
    }
    for key, name in names.items():
        print(f"| {name} | {cells(fused[key])} | {cells(blas[key])} |")
    if solves:
        (rf, tf), (rb, tb) = solves["numba"], solves["torch"]
        print(
            f"| whole solve ÷ iterations ({rf.iterations} / {rb.iterations}, builds included) "
            f"| {cells(tf / rf.iterations)} | {cells(tb / rb.iterations)} |"
        )


def _rank(rank: int, world: int, tmp: str, lam: float, threads: int) -> None:
    import torch.distributed as dist

    from selfclust.collectives import WORLD

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rv", rank=rank, world_size=world)
    z = torch.load(f"{tmp}/z.pt", mmap=True)
    n = z.shape[0]
    lo, hi = rank * n // world, (rank + 1) * n // world
    mine = z[lo:hi].clone()
    sinkhorn_knopp(mine, lam, group=WORLD, max_iters=3)  # warm-up (threads, gloo)
    dist.barrier()
    t = time.perf_counter()
    res = sinkhorn_knopp(mine, lam, group=WORLD)
    total = time.perf_counter() - t
    torch.save({"labels": res.labels, "iters": res.iterations, "time": total}, f"{tmp}/r{rank}.pt")
    dist.destroy_process_group()


def distributed(z: torch.Tensor, lam: float, world: int) -> tuple[torch.Tensor, int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(z, f"{tmp}/z.pt")
        mp.start_processes(_rank, args=(world, tmp, lam, 1), nprocs=world, start_method="spawn")
        outs = [torch.load(f"{tmp}/r{r}.pt") for r in range(world)]
    labels = torch.cat([o["labels"] for o in outs])
    return labels, outs[0]["iters"], max(o["time"] for o in outs)


def row(name: str, seconds: float, iters: int | str, err: float | str, note: str = "") -> None:
    e = f"{err:.1e}" if isinstance(err, float) else err
    print(f"| {name} | {seconds:.2f} | {iters} | {e} | {note} |")


def cpu_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    z = simulated_logits(args.n, args.k, args.classes, args.margin, args.seed)
    print(
        f"N={args.n} K={args.k} λ={args.lam}, torch threads {args.threads}, "
        f"load average {os.getloadavg()[0]:.2f}\n"
    )
    solve(z[:2000], args.lam, "numba")  # warm-up: loads (or first compiles) the numba kernels
    ours, t_ours = solve(z, args.lam, "numba", args.repeat)
    blas, t_blas = solve(z, args.lam, "torch", args.repeat)
    err_ours = column_error_f64(z, args.lam, ours.log_alpha)
    print(f"| solver (best of {args.repeat}) | seconds | iterations | column error | |")
    print("|---|---|---|---|---|")
    row("selfclust (f32, tol 1e-3), fused numba kernels", t_ours, ours.iterations, err_ours)
    agree_blas = float((blas.labels == ours.labels).double().mean())
    err_blas = column_error_f64(z, args.lam, blas.log_alpha)
    row("selfclust, torch/BLAS kernels", t_blas, blas.iterations, err_blas, f"{agree_blas:.4f}")
    if not args.skip_sela:
        zn = z.double().numpy()
        from threadpoolctl import threadpool_limits

        t = time.perf_counter()
        with threadpool_limits(args.threads):  # numpy's BLAS: as many threads as ours
            labels_sela, it_sela, err_sela = sela_numpy(zn, args.lam, max_iters=args.sela_max_iters)
        t_sela = time.perf_counter() - t
        del zn
        agree = float((torch.from_numpy(labels_sela) == ours.labels).double().mean())
        note = f"label agreement with ours {agree:.4f}"
        row("SeLa-style numpy f64 (tol 0.1)", t_sela, it_sela, err_sela, note)
        bound = "≥ " if it_sela == args.sela_max_iters else ""
        print(f"\nspeed-up over SeLa-style: {bound}{t_sela / t_ours:.1f}x")
        print(f"per iteration: SeLa-style {1e3 * t_sela / it_sela:.0f} ms (f64, dense P)")
    # Per iteration vs one read of the block, both kernels, at each thread count.
    for threads in sorted({int(t) for t in args.sweep_threads.split(",")} | {args.threads}):
        solves = {"numba": (ours, t_ours), "torch": (blas, t_blas)}
        sweep_table(z, args.lam, threads, solves if threads == args.threads else {})
    torch.set_num_threads(args.threads)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.ranks > 1:
        torch.set_num_threads(1)
        t = time.perf_counter()
        one = sinkhorn_knopp(z, args.lam, group=None)
        t_one = time.perf_counter() - t
        labels, iters, t_many = distributed(z, args.lam, args.ranks)
        same = float((labels == one.labels).double().mean())
        print(
            f"\n| ranks × threads | seconds | iterations | ms/iteration |\n|---|---|---|---|\n"
            f"| 1 × 1 | {t_one:.2f} | {one.iterations} | {1e3 * t_one / one.iterations:.1f} |\n"
            f"| {args.ranks} × 1 (gloo) | {t_many:.2f} | {iters} | "
            f"{1e3 * t_many / iters:.1f} |\n"
            f"\nsame labels as 1 rank: {same:.6f}; speed-up {t_one / t_many:.2f}x"
        )


def simulated_head(
    n: int, k: int, d: int, classes: int, margin: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, d] mixture features and a [k, d] random linear head scaled to a median top-2
    margin of ``margin`` logits (as :func:`simulated_logits`, in d dimensions)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.rand(classes, generator=g) * 0.4 + 0.8
    cls = torch.multinomial(sizes / sizes.sum(), n, replacement=True, generator=g)
    centers = torch.randn(classes, d, generator=g)
    x = centers[cls].add_(0.5 * torch.randn(n, d, generator=g))
    w = torch.randn(k, d, generator=g) / math.sqrt(d)
    top = (x[: min(n, 100_000)] @ w.t()).topk(2, dim=1).values
    return x, w.mul_(margin / (top[:, 0] - top[:, 1]).median())


def _memory_rank(rank: int, tmp: str, lam: float, recompute: bool) -> None:
    import resource

    from selfclust.labels.sinkhorn_logits import head_logits

    torch.set_num_threads(1)
    x, w = torch.load(f"{tmp}/head.pt")
    head = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.zero_()
    sinkhorn_knopp(x[:2000] @ w.t(), lam, group=None)  # warm-up (numba kernels)
    rss0 = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t = time.perf_counter()
    z = LinearLogits(x, head.weight, head.bias) if recompute else head_logits(head, x)
    res = sinkhorn_knopp(z, lam, group=None)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = {"labels": res.labels, "iters": res.iterations, "time": dt, "mem": peak - rss0}
    torch.save(out, f"{tmp}/{'rec' if recompute else 'stored'}.pt")


def recompute_main(args: argparse.Namespace) -> None:
    n, k, d = args.n or 100_000, args.k or 1000, args.recompute
    x, w = simulated_head(n, k, d, args.classes or k, args.margin, args.seed)
    block = n * k * 4 / 2**20
    print(f"N={n} K={k} D={d} λ={args.lam}, 1 thread, load {os.getloadavg()[0]:.2f}\n")
    print("| logits | seconds | iterations | peak memory above the features | labels |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        torch.save((x, w), f"{tmp}/head.pt")
        outs = {}
        for rec in (False, True):
            mp.start_processes(
                _memory_rank, args=(tmp, args.lam, rec), nprocs=1, start_method="spawn"
            )
            outs[rec] = torch.load(f"{tmp}/{'rec' if rec else 'stored'}.pt")
    for rec, name in ((False, "stored (head_logits)"), (True, "recomputed (LinearLogits)")):
        o = outs[rec]
        same = float((o["labels"] == outs[False]["labels"]).double().mean())
        mib = o["mem"] / 2**20
        print(
            f"| {name} | {o['time']:.2f} | {o['iters']} | {mib:.0f} MiB "
            f"({mib / block:.2f} blocks of {block:.0f} MiB) | {same:.6f} |"
        )


def sets_main(args: argparse.Namespace) -> None:
    """Several logit sets, one after the other: seconds (best of ``--repeat``), iterations and
    kernel builds (the first one and each absorption's) at ``--check-every``."""
    digits = Path(__file__).resolve().parents[2] / "shared" / "data" / "sklearn_digits"

    def confident_digits() -> torch.Tensor:  # −||x − μ_c||² / 200 to the 10 class means
        d = np.load(digits / "sklearn_digits.npz")
        x = torch.from_numpy(d["x"].reshape(len(d["x"]), -1)).double()
        y = torch.from_numpy(d["y"]).long()
        mu = torch.stack([x[y == c].mean(0) for c in range(10)])
        return (-torch.cdist(x, mu).square() / 200).float()

    sets = [  # (name, λ, logits)
        ("100k × 1000, margin 3", 25.0, lambda: simulated_logits(100_000, 1000, 1000, 3.0, 0)),
        ("the same", 50.0, lambda: simulated_logits(100_000, 1000, 1000, 3.0, 0)),
        ("100k × 1000, margin 1.5", 25.0, lambda: simulated_logits(100_000, 1000, 1000, 1.5, 1)),
        ("50k × 300, margin 5", 25.0, lambda: simulated_logits(50_000, 300, 300, 5.0, 2)),
        ("60k × 3000, margin 3", 25.0, lambda: simulated_logits(60_000, 3000, 3000, 3.0, 3)),
        ("sklearn digits (1,797 × 10)", 25.0, confident_digits),
        ("the same", 50.0, confident_digits),
    ]
    load = os.getloadavg()[0]
    print(f"{args.threads} thread(s), check every {args.check_every}, load {load:.2f}")
    print("\n| logits | λ | seconds | iterations | kernel builds | column error |")
    print("|---|---|---|---|---|---|")
    for name, lam, make in sets:
        z = make()
        sinkhorn_knopp(z[: max(2000, 2 * z.shape[1])], lam, group=None)  # warm-up (numba kernels)
        best, res = math.inf, None
        for _ in range(args.repeat):
            t = time.perf_counter()
            res = sinkhorn_knopp(z, lam, check_every=args.check_every, group=None)
            best = min(best, time.perf_counter() - t)
        assert res is not None
        builds = 1 + res.rebuilds  # the first build and each absorption's
        row = f"| {name} | {lam:g} | {best:.2f} | {res.iterations} | {builds} "
        print(row + f"| {res.error:.1e} |")


def gpu_main(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (none found)")
    n, k, heads = args.n or 1_281_167, args.k or 3000, args.heads
    print(f"{torch.cuda.get_device_name()}: N={n} K={k} λ={args.lam}, {heads} heads")
    z = simulated_logits(n, k, args.classes, args.margin, args.seed, "cuda")
    torch.cuda.synchronize()

    def read() -> None:
        z.sum()
        torch.cuda.synchronize()

    t_read = best_of(read)
    results: list[SinkhornResult] = []
    total = 0.0
    for h in range(heads):
        if h:  # a new head: new logits (same distribution), generated in place
            z = simulated_logits(n, k, args.classes, args.margin, args.seed + h, "cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        results.append(sinkhorn_knopp(z, args.lam, check_every=10, group=None))
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        total += dt
        r = results[-1]
        print(f"head {h}: {dt:.2f} s, {r.iterations} iterations, error {r.error:.1e}")
        if args.budget_s is not None and total + dt > args.budget_s:  # the next would not fit
            break
    heads = len(results)
    t_it = per_iteration(z, args.lam, 0)["sweep"]
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"\n| | value |\n|---|---|\n| {heads} heads total | {total:.2f} s "
        f"({total / heads:.2f} s per head) |\n"
        f"| per iteration | {1e3 * t_it:.2f} ms ({t_it / t_read:.2f}× one block.sum()) |\n"
        f"| block.sum() | {1e3 * t_read:.2f} ms |\n| peak GPU memory | {peak:.1f} GiB |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="samples (100000; --gpu: 1281167)")
    ap.add_argument("--k", type=int, default=None, help="clusters (1000; --gpu: 3000)")
    ap.add_argument("--lam", type=float, default=25.0)
    ap.add_argument("--classes", type=int, default=None, help="mixture components (K)")
    ap.add_argument("--margin", type=float, default=3.0, help="median top-2 logit margin")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="CPU solves: best of this many")
    ap.add_argument(
        "--sweep-threads", default="1,2", help="thread counts for the per-iteration tables"
    )
    ap.add_argument("--ranks", type=int, default=2, help="gloo ranks to compare with 1 (0: skip)")
    ap.add_argument("--skip-sela", action="store_true")
    ap.add_argument(
        "--sela-max-iters", type=int, default=None, help="stop SeLa-style early (a lower bound)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu", action="store_true", help="ImageNet size on one CUDA device")
    ap.add_argument("--heads", type=int, default=10, help="--gpu: heads solved one by one")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="--gpu: no new head after this many seconds"
    )
    ap.add_argument(
        "--recompute", type=int, default=0, metavar="D", help="stored vs recomputed logits"
    )
    ap.add_argument("--sets", action="store_true", help="several logit sets: iterations, builds")
    ap.add_argument("--check-every", type=int, default=1, help="--sets: convergence test interval")
    args = ap.parse_args()
    if args.sets:
        torch.set_num_threads(args.threads)
        sets_main(args)
        return
    if args.gpu:
        args.classes = args.classes or args.k or 3000
        gpu_main(args)
        return
    args.n, args.k = args.n or 100_000, args.k or 1000
    args.classes = args.classes or args.k
    if args.recompute:
        recompute_main(args)
        return
    cpu_main(args)


if __name__ == "__main__":
    main()
