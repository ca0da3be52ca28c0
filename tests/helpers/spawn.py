"""Run a function on several gloo ranks (spawned processes) and collect their results."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMEOUT_S = 240


def _main(fn: Callable[..., Any], rank: int, world: int, tmp: str, args: tuple) -> None:
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


def run_ranks(fn: Callable[..., Any], world: int, tmp: Path, *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; results in rank order."""
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_main, args=(fn, r, world, str(tmp), args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    if alive:
        raise TimeoutError(f"{len(alive)} rank(s) still running after {TIMEOUT_S}s")
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
