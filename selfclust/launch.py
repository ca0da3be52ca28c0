"""The Ray edge: turn a config and a run dir into a Ray Train ``TorchTrainer`` run.

Everything Ray-specific lives here: starting or joining the cluster, the worker entry point
that maps Ray's context onto :class:`selfclust.train.loop.WorkerContext`, and the persistent run
identity (``run.json``) that makes rerunning the same command resume the same run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml

from selfclust.checkpoint import check_compatible
from selfclust.config import RunConfig

RUN_FILE = "run.json"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_identity(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """Load or create ``run.json``: the Ray run name and W&B id that persist across reruns.

    A run dir that already belongs to a run with another config is refused, naming the keys.
    """
    path = run_dir / RUN_FILE
    if path.is_file():
        info = json.loads(path.read_text())
        check_compatible(info["config"], cfg, f"run dir {run_dir}")
        info["config"] = cfg.to_dict()  # how-to-run keys (workers, logging) may change
    else:
        if run_dir.exists() and any(p.name != "shards" for p in run_dir.iterdir()):
            raise FileExistsError(
                f"run dir {run_dir} is not empty and holds no {RUN_FILE}: it is not a selfclust "
                "run; choose an empty or new --run-dir"
            )
        token = uuid.uuid4().hex[:8]
        info = {"name": f"selfclust-{token}", "wandb_id": f"sc{token}", "config": cfg.to_dict()}
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(info, indent=2))
    _atomic_write(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return info


def resolve_data(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """A built-in dataset name becomes a shard dir under RUN_DIR/shards (written once); a
    relative local path becomes absolute (from where the command runs: the Ray workers run
    in another directory)."""
    from selfclust.data.urls import is_local
    from selfclust.shards.write import BUILTIN, write_shards

    updates: dict[str, Any] = {}
    for key in ("train", "eval"):
        name = getattr(cfg.data, key)
        if name in BUILTIN and not Path(name).exists():
            out = run_dir / "shards" / name
            if not (out / "manifest.json").is_file():
                write_shards(name, out)
            updates[key] = str(out.resolve())
        elif name and is_local(name) and not os.path.isabs(name):
            updates[key] = os.path.abspath(name)
    if not updates:
        return cfg
    data = cfg.data.model_copy(update=updates)
    return cfg.model_copy(update={"data": data})


def preflight(cfg: RunConfig) -> None:
    """Check what depends on the data before any worker starts, so errors read plainly."""
    from selfclust.data.streams import ShardSet, steps_per_epoch

    shards = ShardSet.open(cfg.data.train, cfg.data.io_timeout_s)
    if cfg.data.eval:
        ShardSet.open(cfg.data.eval, cfg.data.io_timeout_s)
    n, m = shards.num_samples, cfg.method
    if m.clusters > n:
        raise ValueError(
            f"method.clusters={m.clusters} exceeds the {n} samples in {cfg.data.train}: "
            "K clusters need at least K samples"
        )
    workers = max(1, cfg.trainer.num_workers)
    steps_per_epoch(n, workers, cfg.optim.batch_size // workers)  # raises if N < batch


def _worker_entry(payload: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from selfclust.train.loop import WorkerContext, train_loop

    # Ray Train's per-report INFO lines ("Reporting training result", "Checkpoint successfully
    # created") would bury the progress lines: warnings and errors only.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # the report lines come from a logger named after its file
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    cfg = RunConfig.model_validate(payload["config"])
    tctx = ray.train.get_context()
    restore_dir = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        local = Path(ckpt.path)
        restore_dir = str(local) if local.is_dir() else ckpt.to_directory()

    def report(metrics: dict[str, Any], path: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(path) if path else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def preemption() -> dict[str, Any] | None:
        info = ray.train.get_preemption_info()  # a barrier over all ranks (~0.3 s here)
        if info is None:
            return None
        return {"deadline_ms": info.deadline_ms, "ranks": info.preempted_ranks}

    def preemption_seen() -> bool | None:
        """This worker's own copy of the notice, read without a barrier (None: unknown).

        Ray's watcher hands the notice to every worker; reading it locally lets the ranks
        agree with one tiny all-reduce and pay the barrier only once a notice exists.
        """
        try:
            from ray.train.v2._internal.execution.context import get_train_context

            return get_train_context().preemption_context.preemption_info is not None
        except (ImportError, AttributeError, RuntimeError):
            return None

    device = ray.train.torch.get_device() if cfg.trainer.use_gpu else torch.device("cpu")
    ctx = WorkerContext(
        rank=tctx.get_world_rank(),
        world_size=tctx.get_world_size(),
        device=device,
        report=report,
        preemption=preemption,
        preemption_seen=preemption_seen,
        checkpoint_dir=restore_dir,
        run_dir=Path(payload["run_dir"]),
        wandb_id=payload["wandb_id"],
    )
    train_loop(cfg, ctx)


def _init_ray(cfg: RunConfig) -> None:
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
        return
    need = max(1, cfg.trainer.num_workers) * cfg.trainer.cpus_per_worker
    num_cpus = cfg.ray.num_cpus or max(need, os.cpu_count() or 1)
    # The dashboard also serves the state API that Ray Train's placement-group cleaner polls.
    # address="local": always a new cluster of our own, never one another process left behind.
    try:
        ray.init(address="local", num_cpus=num_cpus, log_to_driver=True)
    except Exception as e:
        # A half-started local node (e.g. the GCS timing out on an overloaded machine) keeps
        # its processes, and the driver would wait on them: stop them, then fail clearly.
        ray.shutdown()
        raise RuntimeError(
            f"could not start a local Ray cluster ({type(e).__name__}: {e}); the machine may be "
            "overloaded or out of memory/disk under /tmp/ray: rerun the same command (the run "
            "resumes), or join a running cluster with ray.address=auto"
        ) from e


def train(cfg: RunConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir``; return the summary written to summary.json."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = resolve_data(cfg, run_dir)
    preflight(cfg)
    info = run_identity(run_dir, cfg)
    done = finished_summary(run_dir)
    if done is not None:
        print(f"{run_dir} already finished at step {done['steps']}: nothing to train")
        return done
    _init_ray(cfg)
    storage = cfg.ray.storage_path or str(run_dir / "ray")
    t = cfg.trainer
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={
            "config": cfg.to_dict(),
            "run_dir": str(run_dir),
            "wandb_id": info["wandb_id"],
        },
        # CPU tensors (counts, labels, the bank) travel over gloo, CUDA ones over nccl.
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
        ),
        run_config=RayRunConfig(
            name=info["name"],
            storage_path=storage,
            # ray.train's FailureConfig is Train V2's (the stubs see V1's).
            failure_config=FailureConfig(  # type: ignore[call-arg]
                max_failures=t.max_failures, max_preemption_failures=t.max_preemptions
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics = result.metrics or {}
    if result.checkpoint is None or "summary" not in metrics:
        raise RuntimeError(f"training ended without a final checkpoint; see {storage}")
    summary = dict(metrics["summary"])
    summary["checkpoint"] = result.checkpoint.path
    summary["run_name"] = info["name"]
    _atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that already ended, if its final checkpoint is intact.

    Rerunning a finished command then costs no Ray cluster; a run whose final checkpoint went
    missing or is damaged is trained (resumed) again instead.
    """
    from selfclust.checkpoint import is_complete

    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary: dict[str, Any] = json.loads(path.read_text())
    checkpoint = summary.get("checkpoint")
    return summary if checkpoint and is_complete(Path(checkpoint)) else None


def latest_checkpoint(run_dir: Path) -> Path:
    """The final checkpoint recorded in summary.json, else the newest complete one in storage.

    Incomplete directories (a write or an upload cut off half-way) are never chosen.
    """
    from selfclust.checkpoint import is_complete

    summary = run_dir / "summary.json"
    if summary.is_file():
        path = Path(json.loads(summary.read_text())["checkpoint"])
        if is_complete(path):
            return path
    roots = [run_dir / "ray"]
    info_file = run_dir / RUN_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        storage = (info.get("config", {}).get("ray") or {}).get("storage_path")
        if storage and "://" not in storage:
            roots.insert(0, Path(storage))
    found = [
        p.parent
        for root in roots
        for p in root.glob("*/checkpoint_*/state.pt")
        if is_complete(p.parent)
    ]
    if not found:
        raise FileNotFoundError(
            f"{run_dir} holds no complete checkpoint (no summary.json, nothing complete under "
            + ", ".join(str(r) for r in roots)
            + ")"
        )
    return max(found, key=lambda d: (d / "state.sha256").stat().st_mtime)
