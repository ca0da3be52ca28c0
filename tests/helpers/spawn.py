"""Run a function on several gloo ranks (fresh processes) and collect their results.

The ranks are forked from a fork server (multiprocessing's "forkserver" start method): a fresh
interpreter, started once per test session, that has imported torch, torchvision and the
trainer and has run nothing else (no threads, no process group, no OpenMP pool). A rank then
starts in milliseconds instead of importing torch and torchvision (seconds; ~10 s on a busy
2-core box) as "spawn" does for every rank of every test. Each rank gets the test's current
environment and ``sys.path`` as under "spawn"; ``SELFCLUST_TEST_START=spawn`` goes back to
plain spawning.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMEOUT_S = 240
# Imported once in the fork server; what most ranks need. Nothing here starts a thread at
# import (numba, faiss, UMAP and Ray are left to the ranks that use them).
PRELOAD = ["torch", "torch.distributed", "torchvision.models", "selfclust.train.loop"]


def context() -> Any:
    """The start method for rank processes (see the module docstring)."""
    method = os.environ.get("SELFCLUST_TEST_START", "forkserver")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)  # read when the server starts (the first call)
    return ctx


def _main(
    fn: Callable[..., Any], rank: int, world: int, tmp: str, args: tuple, env: dict[str, str]
) -> None:
    os.environ.clear()  # the test's environment now, not the fork server's at its start
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    out = Path(tmp) / f"rank{rank}.pkl"
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world
        )
        result = fn(rank, world, *args)
        dist.destroy_process_group()
        out.write_bytes(pickle.dumps(("ok", result)))
    except BaseException:  # report any failure to the test instead of hanging it
        out.write_bytes(pickle.dumps(("error", traceback.format_exc())))


def run_ranks(
    fn: Callable[..., Any], world: int, tmp: Path, *args: Any, timeout_s: float = TIMEOUT_S
) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; results in rank order. A rank still
    running after ``timeout_s`` (all ranks together) is killed and fails the call."""
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = context()
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_main, args=(fn, r, world, str(tmp), args, env)) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    if alive:
        raise TimeoutError(f"{len(alive)} rank(s) still running after {timeout_s}s")
    results = []
    for r in range(world):
        f = tmp / f"rank{r}.pkl"
        if not f.exists():
            raise RuntimeError(f"rank {r} exited without a result (exit code {procs[r].exitcode})")
        status, value = pickle.loads(f.read_bytes())
        if status != "ok":
            raise RuntimeError(f"rank {r} failed:\n{value}")
        results.append(value)
    return results


def train_rank(
    rank: int, world: int, shards: str, out: str, overrides: list[str], resume: str | None
) -> dict:
    """One rank of the trainer's worker loop in this process (no Ray): the summary, and each
    reported checkpoint copied under ``out`` as Ray's storage would keep it."""
    import shutil

    import torch

    from selfclust.config import load_config
    from selfclust.train.context import WorkerContext
    from selfclust.train.loop import train_loop

    cfg = load_config(None, [f"data.train={shards}", *overrides])
    saved: list[tuple[dict, str]] = []

    def report(metrics: dict, path: str | None) -> None:
        if path is not None:
            dest = Path(out) / f"ckpt-{len(saved):03d}"
            shutil.copytree(path, dest)
            saved.append((metrics, str(dest)))

    ctx = WorkerContext(
        rank=rank,
        world_size=world,
        device=torch.device("cpu"),
        report=report,
        checkpoint_dir=resume,
        run_dir=Path(out) / "run",
        wandb_id="test",
    )
    return {"summary": train_loop(cfg, ctx), "saved": saved}
