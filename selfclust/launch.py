"""The Ray edge: turn a config and a run dir into a Ray Train ``TorchTrainer`` run.

Everything Ray-specific lives here: starting or joining the cluster, the worker entry point
that maps Ray's context onto :class:`selfclust.train.context.WorkerContext`, and the driver side of
``selfclust train``: data resolution and preflight checks, then ``TorchTrainer.fit``. The run
dir's files (``run.json`` etc.) are :mod:`selfclust.rundir`'s.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from types import ModuleType
from typing import Any

from selfclust.config import RunConfig
from selfclust.data.preflight import check_sets, preflight, resolve_data
from selfclust.error_log import RAY_ERROR_LOGGERS as RAY_ERROR_LOGGERS
from selfclust.error_log import hide_user_error_logs, log_user_error, user_error
from selfclust.errors import ERROR_LOG, UserError
from selfclust.ray_console import RayOutput
from selfclust.recipe import with_recipe
from selfclust.rundir import finished_summary, run_identity, write_summary
from selfclust.train.gpu import check_cluster_gpus, check_worker_gpu


def ray_train_context() -> ModuleType | None:
    """Ray Train V2's private ``ray.train.v2._internal.execution.context``, or None where it
    cannot be imported. Private API, pinned as ``ray==2.60.*`` in pyproject.toml and checked
    by tests/test_launch_private.py; used for what Ray has no public API for: the logger of
    the per-report lines, and a worker's own copy of a preemption notice."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return None
    return context


def _quiet_ray_train_logs() -> None:
    """Ray Train's per-report INFO lines ("Reporting training result", "Checkpoint
    successfully created") would bury the progress lines: warnings and errors only."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    context = ray_train_context()
    if context is not None:  # the report lines come from a logger named after its file
        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _preemption_seen() -> bool | None:
    """This worker's own copy of the preemption notice, read without a barrier (None:
    unknown).

    Ray's watcher hands the notice to every worker; reading it locally lets the ranks agree
    with one tiny all-reduce and pay the barrier only once a notice exists.
    """
    context = ray_train_context()
    if context is None:
        return None
    try:
        return context.get_train_context().preemption_context.preemption_info is not None
    except (ImportError, AttributeError, RuntimeError):
        return None


def _worker_entry(payload: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from selfclust.train.context import WorkerContext
    from selfclust.train.loop import train_loop

    _quiet_ray_train_logs()
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

    device = ray.train.torch.get_device() if cfg.trainer.use_gpu else torch.device("cpu")
    ctx = WorkerContext(
        rank=tctx.get_world_rank(),
        world_size=tctx.get_world_size(),
        device=device,
        report=report,
        preemption=preemption,
        preemption_seen=_preemption_seen,
        checkpoint_dir=restore_dir,
        run_dir=Path(payload["run_dir"]),
        wandb_id=payload["wandb_id"],
    )
    try:
        train_loop(cfg, ctx)
    except UserError:
        log_user_error(ctx.run_dir, ctx.rank)
        hide_user_error_logs(worker=True)
        raise


def _gpu_preflight(payload: dict[str, Any]) -> None:
    """Runs on every GPU worker before its process group exists (without CUDA, NCCL's would
    fail first and bury the reason): :func:`selfclust.train.gpu.check_worker_gpu`."""
    import ray.train
    import ray.train.torch

    cfg = RunConfig.model_validate(payload["config"])
    rank = ray.train.get_context().get_world_rank()
    try:
        check_worker_gpu(cfg.trainer, ray.train.torch.get_device(), rank)
    except UserError:
        log_user_error(Path(payload["run_dir"]), rank)
        raise


def _torch_config(use_gpu: bool, payload: dict[str, Any]) -> Any:
    """gloo; with GPUs, gloo for CPU tensors (counts, labels, the bank) and nccl for CUDA ones,
    set up after :func:`_gpu_preflight` on every worker. A user error there ends the run as a
    controller failure (never retried). Private API: ``_TorchBackend`` (ray==2.60.*)."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    if not use_gpu:
        return TorchConfig(backend="gloo")

    class Backend(_TorchBackend):
        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            worker_group.execute(_gpu_preflight, payload)
            super().on_start(worker_group, backend_config)

    class Config(TorchConfig):
        @property
        def backend_cls(self) -> type:
            return Backend

    return Config(backend="cpu:gloo,cuda:nccl")


def _stop_on_user_error() -> Any:
    """A callback on Ray Train's controller that raises a worker's :class:`UserError` there:
    the run ends at once (Ray Train retries worker failures, never the controller's)."""
    from ray.train import ControllerError, UserCallback

    class StopOnUserError(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
            for _, error in sorted(worker_exceptions.items()):
                if isinstance(error, UserError):
                    hide_user_error_logs(worker=False)
                    # as a ControllerError, the controller does not log it again
                    raise ControllerError(error)

    return StopOnUserError()


STATE_API_ENV = "RAY_API_SERVER_ADDRESS"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init_ray(cfg: RunConfig) -> None:
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
        return
    need = max(1, cfg.trainer.num_workers) * cfg.trainer.cpus_per_worker
    # The machine's CPUs, or the workers' total if more (Ray then oversubscribes; to cap a
    # local cluster, start it with `ray start --head --num-cpus N` and set ray.address).
    num_cpus = max(need, os.cpu_count() or 1)
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls; left
    # to find it, the cleaner reads /tmp/ray/ray_current_cluster, which a killed `ray start`
    # leaves behind (a dead cluster: each fit() waited 12 s at its end, the run unguarded).
    # So the dashboard gets a known port, and every process of the cluster its address.
    port = _free_port()
    os.environ[STATE_API_ENV] = f"http://127.0.0.1:{port}"
    # address="local": always a new cluster of our own, never one another process left behind.
    try:
        ray.init(address="local", num_cpus=num_cpus, dashboard_port=port, log_to_driver=True)
    except Exception as e:
        # A half-started local node (e.g. the GCS timing out on an overloaded machine) keeps
        # its processes, and the driver would wait on them: stop them, then fail clearly.
        ray.shutdown()
        raise RuntimeError(
            f"could not start a local Ray cluster ({type(e).__name__}: {e}); the machine may be "
            "overloaded or out of memory/disk under /tmp/ray: rerun the same command (the run "
            "resumes), or join a running cluster with ray.address=auto"
        ) from e
    check_cluster_gpus(cfg.trainer, ray.cluster_resources().get("GPU", 0), local=True)


# Ray Train V2's controller polls the workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default
# 2 s), and a worker's ray.train.report waits for that poll: every checkpoint blocked training
# for up to 2 s (2.0 s per report on 2 CPU workers, 0.1 s at a 0.1 s interval). The poll is one
# actor call per worker: 0.1 s up to 20 workers, growing to Ray's 2 s at 400.
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_S_PER_WORKER = 0.005


def report_poll_interval(workers: int) -> float:
    """Seconds between the controller's polls of ``workers`` workers (see POLL_ENV)."""
    return min(2.0, max(0.1, POLL_S_PER_WORKER * workers))


def _torch_trainer(cfg: RunConfig, run_dir: Path, info: dict[str, Any], storage: str) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    t = cfg.trainer
    payload = {"config": cfg.to_dict(), "run_dir": str(run_dir), "wandb_id": info["wandb_id"]}
    return TorchTrainer(
        _worker_entry,
        train_loop_config=payload,
        torch_config=_torch_config(t.use_gpu, payload),
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
            callbacks=[_stop_on_user_error()],
        ),
    )


def train(cfg: RunConfig, run_dir: str | Path, verbose: bool = False) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir``; return the summary written to summary.json.
    Ray's output goes to RUN_DIR/ray.log, or with ``verbose`` also to the terminal
    (:mod:`selfclust.ray_console`)."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # The driver's value reaches the controller (Ray propagates its RAY_TRAIN_* variables); a
    # value the user set wins.
    os.environ.setdefault(POLL_ENV, str(report_poll_interval(cfg.trainer.num_workers)))
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # Before any worker starts, each mistake found once, as one line: the shards first (a
    # missing one named before the recipe reads its sample), then what the recipe decides.
    cfg = resolve_data(cfg, run_dir)
    shards = check_sets(cfg)
    cfg = with_recipe(cfg, shards)  # recipe: auto fills in what data decide
    preflight(cfg, shards)
    info = run_identity(run_dir, cfg)
    done = finished_summary(run_dir)
    if done is not None:
        print(f"{run_dir} already finished at step {done['steps']}: nothing to train")
        return done
    # (Ray's driver logs move to ray.log before the cluster starts; the bar ends at the end)
    with RayOutput(run_dir, verbose, local=not cfg.ray.address) as output:
        _init_ray(cfg)
        output.worker_output()
        storage = cfg.ray.storage_path or str(run_dir / "ray")
        try:
            result = _torch_trainer(cfg, run_dir, info, storage).fit()
            if result.error is not None:
                raise result.error
        except Exception as e:  # a worker's user error: one line (cli), the traceback logged
            user = user_error(e)
            if user is None:
                raise
            raise type(user)(f"{user} (traceback: {run_dir / ERROR_LOG})") from None
    metrics = result.metrics or {}
    if result.checkpoint is None or "summary" not in metrics:
        raise RuntimeError(f"training ended without a final checkpoint; see {storage}")
    summary = dict(metrics["summary"])
    summary["checkpoint"] = result.checkpoint.path
    summary["run_name"] = info["name"]
    write_summary(run_dir, summary)
    return summary
