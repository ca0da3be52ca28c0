"""This rank's view of the training data: its batches of an epoch and of a label pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfclust import collectives as C
from selfclust.config import RunConfig
from selfclust.data.plan import steps_per_epoch
from selfclust.data.shardset import ShardSet
from selfclust.data.streams import Batches, eval_batches, train_batches
from selfclust.train.context import WorkerContext


@dataclass
class RankData:
    cfg: RunConfig
    shards: ShardSet
    rank: int
    world_size: int
    device: torch.device
    # The loader workers draw the device augmentation's parameters of each training batch
    # (a method that augments on the device: SeLa with augment.where=device).
    prefetch_augment: bool = False

    @classmethod
    def of(
        cls, cfg: RunConfig, shards: ShardSet, ctx: WorkerContext, prefetch_augment: bool
    ) -> RankData:
        return cls(cfg, shards, ctx.rank, ctx.world_size, ctx.device, prefetch_augment)

    def __post_init__(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        # DataLoader workers: explicit, or the CPUs Ray gives this worker minus the main one.
        # The CPUs Ray reserves for this worker, less the training process, read and decode.
        self.loader_workers = max(0, t.cpus_per_worker - 1)
        self.local_batch = cfg.optim.batch_size // self.world_size  # the global batch, split
        self.steps_per_epoch = steps_per_epoch(self.num_samples, self.world_size, self.local_batch)

    @property
    def num_samples(self) -> int:
        return self.shards.num_samples

    @property
    def eval_batch(self) -> int:
        """Batch size of label passes and scoring (no gradients: at least 256)."""
        return max(self.local_batch, 256)

    def epoch(self, epoch: int, skip_steps: int) -> Batches:
        """This rank's batches of ``epoch`` (the same number on every rank), after the first
        ``skip_steps`` (a mid-epoch resume skips them without decoding): ``(images, idx)``,
        or ``(images, idx, augmentation parameters)`` with ``prefetch_augment``."""
        cfg = self.cfg
        return train_batches(
            self.shards,
            self.rank,
            self.world_size,
            self.local_batch,
            cfg.seed,
            epoch,
            num_workers=self.loader_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            skip_steps=skip_steps,
            image_size=cfg.data.image_size,
            loader_augment=cfg.augment if cfg.augment.where == "loader" else None,
            pin_memory=self.device.type == "cuda",
            device_augment=cfg.augment if self.prefetch_augment else None,
        )

    def label_pass(self, model: nn.Module, shards: ShardSet | None = None) -> Batches:
        """Every sample of ``shards`` (default: the training shards) once over all ranks.

        First gives every rank rank 0's BatchNorm statistics: DDP keeps parameters identical
        but each rank's running stats follow its own batches, and the label pass, evaluation
        and the digest must all use one model.
        """
        sync_buffers(model)
        return eval_batches(
            shards or self.shards,
            self.rank,
            self.world_size,
            self.eval_batch,
            num_workers=self.loader_workers,
            image_size=self.cfg.data.image_size,
            pin_memory=self.device.type == "cuda",
        )


def sync_buffers(model: nn.Module) -> None:
    """Broadcast rank 0's buffers (BatchNorm running statistics) to every rank."""
    for buf in model.buffers():
        C.broadcast(buf, 0)
