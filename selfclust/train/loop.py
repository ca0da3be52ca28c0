"""The worker loop: plain PyTorch, run once per rank.

It knows nothing about Ray beyond :class:`~selfclust.train.context.WorkerContext`, and nothing
about the objective beyond :class:`~selfclust.methods.base.Method`: restore → (label pass on
schedule → step → log → checkpoint) per epoch → final scoring. Read top to bottom:
:meth:`Trainer.run` is the whole run; label passes are :meth:`Trainer.relabel`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from typing import Any

import torch

from selfclust import collectives as C
from selfclust.checkpoint import check_compatible, make_state, read_state, write_state
from selfclust.config import RunConfig
from selfclust.data.shardset import ShardSet
from selfclust.labels.bank import LabelBank
from selfclust.labels.label_pass import gather_bank
from selfclust.methods.registry import build_method, build_model
from selfclust.models.base import image_side
from selfclust.runlog import MetricsLog, Progress
from selfclust.train.batches import RankData
from selfclust.train.context import WorkerContext, configure_process
from selfclust.train.optim import build_optimizer
from selfclust.train.preemption import PreemptionWatcher
from selfclust.train.schedule import RelabelSchedule
from selfclust.train.state import DataHealth, LossTracker, TrainPosition, resumed_record
from selfclust.train.step import Precision, ddp_forward, optimizer_step
from selfclust.train.summary import check_finite, final_summary, label_record, train_record


class Trainer:
    """State and steps of one rank; ``run()`` trains to the end and returns the summary."""

    def __init__(self, cfg: RunConfig, ctx: WorkerContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.shards = ShardSet.open(cfg.data.train, cfg.data.io_timeout_s)
        self.n, self.size, t = self.shards.num_samples, cfg.data.image_size, cfg.trainer
        side = image_side(self.size, self.shards.image)
        self.model = build_model(cfg, self.shards.channels, side).to(ctx.device)
        self.precision = Precision.for_device(t, ctx.device)
        self.method = build_method(cfg, self.model, self.n, device=ctx.device,
                                   image_size=self.size, rank=ctx.rank,
                                   precision=self.precision)  # fmt: skip
        if self.method.uses_ddp:
            self.method.forward = ddp_forward(self.model, self.precision, ctx.device,
                                              ctx.world_size, compile=t.compile)  # fmt: skip
        self.data = RankData.of(cfg, self.shards, ctx, prefetch_augment=self.method.device_augment)
        self.steps_per_epoch = self.data.steps_per_epoch
        # A pretraining phase, then clustering for optim.epochs; the LR schedule and the label
        # updates count from the start of the clustering phase.
        pretrain = self.method.pretrain_epochs
        self.epochs = pretrain + cfg.optim.epochs
        self.pretrain_steps = pretrain * self.steps_per_epoch
        self.cluster_steps = cfg.optim.epochs * self.steps_per_epoch
        self.total_steps = self.pretrain_steps + self.cluster_steps
        self.pos = TrainPosition(phase=self.method.phases[0])
        self.optimizer, self.scheduler = self._optimizer()
        m = cfg.method
        self.bank = LabelBank(m.heads, self.n, m.clusters)
        self.log = MetricsLog(ctx.run_dir, cfg, ctx.wandb_id, enabled=ctx.rank == 0)
        self.progress = Progress(self.total_steps, self.epochs, enabled=ctx.rank == 0)
        self.losses = LossTracker(m.heads, self.method.terms)
        self.health = DataHealth()
        self.preemption = PreemptionWatcher(ctx)
        self.updates = RelabelSchedule(self.pretrain_steps, self.cluster_steps, m.relabels,
                                       m.relabel_power, m.relabel_start,
                                       m.manifold_updates())  # fmt: skip

    def _optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """The current phase's optimiser (the checkpoint's phase decides which it saved)."""
        return build_optimizer(self.model, self.pos.phase, self.cfg, self.cluster_steps)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        if ctx.checkpoint_dir:
            self.restore(ctx.checkpoint_dir)
        elif self.pos.phase == "cluster":
            self.relabel(initial=True)
        self.progress.start(self.pos.global_step)
        every = cfg.checkpoint.every_steps
        while self.pos.epoch < self.epochs and not self.method.stopped:
            if self.pos.phase == "pretrain" and self.pos.epoch >= self.method.pretrain_epochs:
                self._start_clustering()
            batches = self.data.epoch(self.pos.epoch, self.pos.step_in_epoch)
            for batch in batches:
                step = self.pos.global_step
                if self.updates.due(step, self.pos.labels_step):
                    self.relabel()
                if self.method.stopped:
                    break
                self._check_preemption()
                self.losses.add(self.train_step(*batch))
                self.pos.global_step += 1
                self.pos.step_in_epoch += 1
                if self.pos.global_step % cfg.trainer.log_every == 0:
                    self._log_train(self.losses.flush(), DataHealth.epoch_counts(batches))
                if every and self.pos.global_step % every == 0:
                    if self.pos.step_in_epoch < self.steps_per_epoch:
                        self._checkpoint_if_finite("step")
            self.health.counts += C.all_reduce_sum(DataHealth.epoch_counts(batches))
            if self.method.stopped:  # DEC converged mid-epoch: the position stays there
                break
            self.pos.epoch += 1
            self.pos.step_in_epoch = 0
            self._checkpoint_if_finite("epoch")
        return self.finish()

    def train_step(self, *batch: torch.Tensor) -> torch.Tensor:
        """One step on ``(images, idx[, aug])``; the logged losses, detached, on the device."""
        loss, logged = self.method.batch_losses(
            *batch, phase=self.pos.phase, epoch=self.pos.epoch,
            step=self.pos.global_step, bank=self.bank,
        )  # fmt: skip
        optimizer_step(self.model, loss, self.optimizer, self.scheduler,
                       grad_clip=self.cfg.optim.grad_clip, sync=not self.method.uses_ddp,
                       world_size=self.ctx.world_size)  # fmt: skip
        return logged

    def _start_clustering(self) -> None:
        """Pretraining → clustering: the first labels (a label pass) and the clustering
        optimiser; checkpointed with the labels."""
        self.pos.phase = "cluster"
        self.pos.labels_step = self.pos.global_step
        self.optimizer, self.scheduler = self._optimizer()
        self.relabel(initial=True)

    # ------------------------------------------------------------------ labels
    def relabel(self, initial: bool = False) -> None:
        """A label update of every rank (collective): the first labels, or the scheduled
        update at this step. Every sample is embedded once over all ranks, the method makes
        this rank's labels (Sinkhorn, k-means, UMAP + GMM, its own targets), and only the
        labels are gathered into every rank's bank."""
        first = self.method.first_bank() if initial else None
        if first is not None:  # SeLa's random labels: no pass over the data
            self.bank.assign(first)
            return
        step, epoch, n, t0 = self.pos.global_step, self.pos.epoch, self.n, time.perf_counter()
        # Marks the start of a full pass over the data (fault tests kill a worker inside it).
        self.log.log({"step": step, "epoch": epoch, "event": "label_pass_start",
                      "initial": initial})  # fmt: skip
        emb = self.method.embed(self.data.label_pass(self.model), n, initial)
        if initial:
            local, update = self.method.first_labels(emb, self.bank)
        else:
            manifold = self.updates.manifold_at(step)
            local, update = self.method.update_labels(emb, self.bank, step, manifold)
        new = gather_bank(local, emb.idx, n, group=C.WORLD, skipped=emb.skipped,
                          fill=self.bank.labels)  # fmt: skip
        record: dict[str, Any] = {"step": step, "epoch": epoch, **update}
        if emb.skipped:
            record["data_skipped"] = emb.skipped
        record["label_change"] = self.bank.assign(new)
        # DEC's stop rule: the same bank, so the same on all ranks
        record.update(self.method.after_change(record["label_change"], initial))
        record = label_record(record, new, self.bank, emb, self.ctx.rank, started=t0)
        self.log.log(record)
        self.progress.labels(record, initial)
        if not initial:
            self.pos.labels_step = step
        # A label pass costs a full sweep of the data: never redo one after a failure.
        self.checkpoint({"kind": "labels"})

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return make_state(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            bank_state=self.bank.state_dict(),
            position=self.pos,
            cfg=self.cfg,
            wandb_id=self.ctx.wandb_id,
            extra={
                **self.losses.state_dict(),
                "world_size": self.ctx.world_size,
                **self.health.state_dict(),
                "method": self.method.state_dict(),
            },
        )

    def restore(self, checkpoint_dir: str) -> None:
        state = read_state(checkpoint_dir)
        check_compatible(state["config"], self.cfg, f"checkpoint {checkpoint_dir}")
        self.model.load_state_dict(state["model"], strict=True)
        self.pos = TrainPosition(**state["position"])
        self.optimizer, self.scheduler = self._optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.bank.load_state_dict(state["bank"])
        extra = state["extra"]
        self.method.load_state_dict(extra["method"])
        if self.pos.phase == "cluster" and self.method.needs_resume_pass:
            self.method.rebuild(self.data.label_pass(self.model), self.n)
        self.losses.load_state_dict(extra)
        self.health.load_state_dict(extra)
        saved_world = int(extra.get("world_size", self.ctx.world_size))
        resumed = resumed_record(self.pos, saved_world, self.ctx.world_size)
        self.log.log(resumed)
        self.progress.resumed(resumed)

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        """All ranks call this; rank 0 writes the state and Ray persists it."""
        path = write_state(self.state()) if self.ctx.rank == 0 else None
        try:
            self.ctx.report({**metrics, **asdict(self.pos)}, path)
        finally:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)

    def _checkpoint_if_finite(self, kind: str) -> None:
        check_finite(self.losses.window_loss, self.pos.global_step)
        self.checkpoint({"kind": kind})

    def _check_preemption(self) -> None:
        """On Ray's preemption notice, checkpoint now (once), then keep training."""
        info = self.preemption.notice(self.pos.global_step)
        if info is None:
            return
        self.log.log({"step": self.pos.global_step, "epoch": self.pos.epoch,
                      "event": "preemption_notice", "deadline_ms": info.get("deadline_ms"),
                      "preempted_ranks": str(info.get("ranks"))})  # fmt: skip
        if self.pos.step_in_epoch:  # (an epoch-start position was just checkpointed)
            self._checkpoint_if_finite("preemption")

    def _log_train(self, mean_losses: torch.Tensor, bad: torch.Tensor) -> None:
        ips = self.progress.rate(self.pos.global_step, self.cfg.optim.batch_size)
        record = train_record(self, mean_losses, bad, ips)
        self.log.log(record)
        self.progress.step(self.pos.global_step, self.pos.epoch, record["loss"], ips)

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict[str, Any]:
        summary = final_summary(self)
        self.log.log({"step": self.pos.global_step, "epoch": self.pos.epoch, "event": "final",
                      **{k: summary[k] for k in ("acc", "nmi", "ari")}})  # fmt: skip
        self.log.summary(summary)
        self.checkpoint({"kind": "final", "summary": summary})
        self.log.close()
        return summary


def train_loop(cfg: RunConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Train this rank to the end (or resume it) and return the run's summary."""
    configure_process(cfg)
    return Trainer(cfg, ctx).run()
