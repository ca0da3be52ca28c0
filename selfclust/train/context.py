"""What a rank knows of the world it runs in, and the process-wide settings it needs.

The worker loop knows nothing about Ray beyond :class:`WorkerContext` (rank, world size,
device, a ``report`` barrier that may carry a checkpoint, and the checkpoint to restore), so it
runs the same under Ray Train (:mod:`selfclust.launch`), under spawned gloo ranks in tests, or
alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfclust.config import RunConfig


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    # report(metrics, checkpoint_dir or None): a barrier; every rank calls it equally often.
    report: Callable[[dict[str, Any], str | None], None]
    checkpoint_dir: str | None  # the checkpoint to restore, if any
    run_dir: Path
    wandb_id: str
    # preemption(): a barrier returning {"deadline_ms", "ranks"} once a node of this worker
    # group is being reclaimed (Ray's drain notice), else None.
    preemption: Callable[[], dict[str, Any] | None] = lambda: None
    # preemption_seen(): this rank's local view of a notice, no barrier (None: unknown).
    preemption_seen: Callable[[], bool | None] = lambda: False


def configure_process(cfg: RunConfig) -> None:
    """Thread counts of this worker process: torch and faiss each bring their own OpenMP, so
    both are set (never in DataLoader workers). With GPUs, cuDNN autotunes its convolutions:
    every training batch has the same shape, so the search runs once per shape. TF32 matmuls
    stay off: the label pass's logits and k-means rely on full fp32 products."""
    torch.set_num_threads(cfg.trainer.cpus_per_worker)
    torch.backends.cudnn.benchmark = cfg.trainer.use_gpu
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    faiss.omp_set_num_threads(cfg.trainer.cpus_per_worker)
