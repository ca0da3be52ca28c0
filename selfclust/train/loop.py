"""The worker loop: plain PyTorch, run once per rank.

It knows nothing about Ray beyond :class:`WorkerContext` (rank, world size, device, a
``report`` barrier that may carry a checkpoint, and the checkpoint to restore), so it runs the
same under Ray Train, under ``torchrun``-style spawned gloo ranks in tests, or alone.
"""

from __future__ import annotations

import bisect
import math
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfclust import collectives as C
from selfclust.checkpoint import Position, check_compatible, make_state, read_state, write_state
from selfclust.config import RunConfig
from selfclust.data.augment import augment, normalize
from selfclust.data.streams import ShardSet, eval_batches, steps_per_epoch, train_batches
from selfclust.eval.metrics import clustering_scores, head_agreement
from selfclust.eval.scoring import BEST_HEAD_RULE, best_head, score_model
from selfclust.labels.bank import LabelBank
from selfclust.labels.label_pass import (
    Embedded,
    embed,
    gather_bank,
    kmeans_labels,
    random_bank,
    sinkhorn_labels,
    thumbnails,
)
from selfclust.labels.manifold import manifold_labels
from selfclust.methods.nets import ClusterNet
from selfclust.methods.registry import build_model
from selfclust.methods.runner import MethodRunner, build_runner
from selfclust.models.base import image_side, model_digest
from selfclust.runlog import MetricsLog, Progress
from selfclust.train.context import WorkerContext, configure_process
from selfclust.train.schedule import lr_at, relabel_steps


@dataclass
class TrainPosition(Position):
    """:class:`Position` plus the phase: ``pretrain`` (DEC/DEPICT/DGG reconstruction epochs,
    initialisation not yet done) or ``cluster`` (SeLa always)."""

    phase: str = "cluster"


class Trainer:
    """State and steps of one rank; ``run()`` trains to the end and returns the summary."""

    def __init__(self, cfg: RunConfig, ctx: WorkerContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.shards = ShardSet.open(cfg.data.train, cfg.data.io_timeout_s)
        self.n = self.shards.num_samples
        m = cfg.method
        channels = self.shards.channels
        self.size = cfg.data.image_size
        t = cfg.trainer
        cuda = ctx.device.type == "cuda"
        side = image_side(self.size, self.shards.image)
        self.model = build_model(cfg, channels, side).to(ctx.device)
        # DEC/DEPICT/DGG: the method's runner computes their losses; gradients are averaged
        # over ranks by one flat all-reduce per step (see _average_gradients), not by DDP.
        self.runner: MethodRunner | None = None
        if isinstance(self.model, ClusterNet):
            self.runner = build_runner(cfg, self.model, self.n)
        if cuda and t.channels_last and self.runner is None:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp: nn.Module = self.model
        if ctx.world_size > 1 and self.runner is None:
            ids = [ctx.device.index] if cuda else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cuda and t.compile:
            self.ddp = torch.compile(self.ddp)  # type: ignore[assignment]
        bf16 = t.precision == "bf16" or (t.precision == "auto" and cuda)
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.memory_format = torch.channels_last if cuda and t.channels_last else None
        # DataLoader workers: explicit, or the CPUs Ray gives this worker minus the main one.
        lw = cfg.data.loader_workers
        self.loader_workers = lw if lw >= 0 else max(0, t.cpus_per_worker - 1)
        self.pin_memory = cuda
        o = cfg.optim
        self.local_batch = o.batch_size // ctx.world_size
        self.steps_per_epoch = steps_per_epoch(self.n, ctx.world_size, self.local_batch)
        # DEC/DEPICT/DGG pretrain for method.pretrain_epochs, then cluster for optim.epochs;
        # the LR schedule and the refreshes count from the start of the clustering phase.
        self.pretrain_epochs = m.pretrain_epochs if self.runner is not None else 0
        self.epochs = self.pretrain_epochs + o.epochs
        self.pretrain_steps = self.pretrain_epochs * self.steps_per_epoch
        self.cluster_steps = o.epochs * self.steps_per_epoch
        self.total_steps = self.pretrain_steps + self.cluster_steps
        self.pos = TrainPosition(phase="cluster" if self.runner is None else "pretrain")
        self._build_optimizer()
        self.bank = LabelBank(m.heads, self.n, m.clusters)
        schedule = relabel_steps(
            self.cluster_steps,
            m.relabels,
            m.relabel_power,
            int(m.relabel_start * self.cluster_steps),
        )
        self.relabel_at = {self.pretrain_steps + s for s in schedule}
        self.log = MetricsLog(ctx.run_dir, cfg, ctx.wandb_id, enabled=ctx.rank == 0)
        self.head_loss = torch.zeros(m.heads)  # running mean of each head's loss (for best head)
        # Per-head loss summed since the last metrics line; checkpointed so that a resumed run
        # logs, and picks its best head, exactly as an uninterrupted one.
        self.window_loss = torch.zeros(m.heads + len(self.terms))
        self.window_n = 0
        self.preemption_saved = False  # one just-in-time checkpoint per notice
        # Bad data met in training over the whole run (all ranks): corrupt images, samples
        # of unreadable shards, unreadable shards; checkpointed, reported in the summary.
        self.data_bad = torch.zeros(3, dtype=torch.int64)
        # Augment in the loader workers (per-sample torchvision v2) or batched on the device.
        self.loader_augment = cfg.augment if cfg.augment.where == "loader" else None

    @property
    def terms(self) -> tuple[str, ...]:
        """Named loss terms logged beside the total (DEC/DEPICT/DGG)."""
        return self.runner.terms if self.runner is not None else ()

    def _build_optimizer(self) -> None:
        """The optimiser and LR schedule of the current phase: Adam at method.pretrain_lr while
        pretraining; optim.name with optim.lr and its schedule afterwards."""
        o, m = self.cfg.optim, self.cfg.method
        params = list(self.model.parameters())
        self.optimizer: torch.optim.Optimizer
        if self.pos.phase == "pretrain":
            self.optimizer = torch.optim.Adam(params, lr=m.pretrain_lr)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
            return
        if o.name == "adam":
            self.optimizer = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(
                params,
                lr=o.lr,
                momentum=o.momentum,
                nesterov=o.nesterov,
                weight_decay=o.weight_decay,
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_at(s, self.cluster_steps, o) / o.lr
        )

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
                "head_loss": self.head_loss.clone(),
                "window_loss": self.window_loss.clone(),
                "window_n": self.window_n,
                "world_size": self.ctx.world_size,
                "data_bad": self.data_bad.clone(),
                "method": self.runner.state_dict() if self.runner is not None else None,
            },
        )

    def restore(self, checkpoint_dir: str) -> None:
        state = read_state(checkpoint_dir)
        check_compatible(state["config"], self.cfg, f"checkpoint {checkpoint_dir}")
        self.model.load_state_dict(state["model"], strict=True)
        self.pos = TrainPosition(**state["position"])
        self._build_optimizer()  # the checkpoint's phase decides which optimiser it saved
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.bank.load_state_dict(state["bank"])
        if self.runner is not None:
            self.runner.load_state_dict(state["extra"]["method"])
            if self.pos.phase == "cluster" and self.runner.needs_resume_pass:
                # per-rank state is not checkpointed: rebuilt from the saved teacher
                self.runner.resume(self._embed(self.shards, fn=self.runner.teacher.features))
        self.head_loss = state["extra"]["head_loss"].clone()
        self.window_loss = state["extra"]["window_loss"].clone()
        self.window_n = int(state["extra"]["window_n"])
        self.data_bad = state["extra"].get("data_bad", self.data_bad).clone()
        # Steps after this checkpoint may already be in metrics.jsonl from the lost attempt;
        # this line marks where the resumed attempt's records start.
        record: dict[str, Any] = {
            "step": self.pos.global_step,
            "epoch": self.pos.epoch,
            "event": "resumed",
            "step_in_epoch": self.pos.step_in_epoch,
        }
        saved_world = int(state["extra"].get("world_size", self.ctx.world_size))
        if saved_world != self.ctx.world_size:
            # Elastic resume: the global batch, steps per epoch, LR and relabel schedules do
            # not depend on the worker count, so the position carries over unchanged. Only
            # the rest of this epoch is drawn from the new split (some of its samples may be
            # seen twice, others not at all); later epochs are as in a fresh run of this size.
            record.update(event="resumed_elastic", from_workers=saved_world)
        record["workers"] = self.ctx.world_size
        self.log.log(record)

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        """All ranks call this; rank 0 writes the state and Ray persists it."""
        path = write_state(self.state()) if self.ctx.rank == 0 else None
        try:
            self.ctx.report({**metrics, **asdict(self.pos)}, path)
        finally:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ labels
    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics.

        DDP keeps parameters identical but each rank's BN running stats follow its own
        batches; the label pass, evaluation and the digest must all use one model.
        """
        for buf in self.model.buffers():
            C.broadcast(buf, 0)

    def _embed(self, shards: ShardSet, pixels: bool = False, fn: Any = None) -> Embedded:
        self._sync_buffers()
        batches = eval_batches(
            shards,
            self.ctx.rank,
            self.ctx.world_size,
            max(self.local_batch, 256),
            num_workers=self.loader_workers,
            image_size=self.size,
        )
        if isinstance(self.model, ClusterNet):  # the method's own input pixels
            features = fn or self.model.features
            return embed(features, batches, self.ctx.device, self.size, shards.num_samples,
                         transform=self.model.inputs)  # fmt: skip
        fn = thumbnails(self.cfg.method.kmeans_pixel_size) if pixels else self.model.backbone
        with torch.autocast(
            self.ctx.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None and not pixels,
        ):
            return embed(fn, batches, self.ctx.device, self.size, shards.num_samples)

    def relabel(self, initial: bool = False) -> None:
        m = self.cfg.method
        if initial and m.init == "random" and self.runner is None:
            self.bank.assign(random_bank(m.heads, self.n, m.clusters, self.cfg.seed))
            return
        # Marks the start of a full pass over the data (fault tests kill a worker inside it).
        self.log.log({"step": self.pos.global_step, "epoch": self.pos.epoch,
                      "event": "label_pass_start", "initial": initial})  # fmt: skip
        self._relabel(initial)
        if not initial:
            self.pos.labels_step = self.pos.global_step
        if self.cfg.checkpoint.after_relabel:
            # A label pass costs a full sweep of the data: never redo one after a failure.
            self.checkpoint({"kind": "labels"})

    def _relabel(self, initial: bool) -> None:
        m = self.cfg.method
        pixels = initial and m.init in ("kmeans_pixels", "manifold_pixels") and self.runner is None
        emb = self._embed(self.shards, pixels=pixels)
        record: dict[str, Any] = {"step": self.pos.global_step, "epoch": self.pos.epoch}
        if self.runner is not None:
            if initial:
                local, extra = self.runner.initialise(emb)
            else:
                seed = self.cfg.seed + self.pos.global_step if self._manifold_now() else None
                local, extra = self.runner.refresh(emb, manifold_seed=seed)
            record.update(event=f"init_{m.cluster_init}" if initial else "relabel", **extra)
        elif (initial and m.init == "manifold_pixels") or (not initial and self._manifold_now()):
            local = manifold_labels(
                emb.features,
                emb.idx,
                m.heads,
                m.clusters,
                m.kmeans_samples,
                self.cfg.seed + (0 if initial else self.pos.global_step),
                self.n,
                neighbors=m.manifold_neighbors,
                dim=m.manifold_dim,
                restarts=m.manifold_restarts,
                candidates=m.manifold_init_candidates if initial else 1,
                select=m.manifold_init_select,
                l2_normalize=not pixels,
                align_to=None if initial else self.bank.labels,
            )
            record["event"] = f"init_{m.init}" if initial else "relabel"
            record["labeller"] = "manifold"
        elif initial:
            local = kmeans_labels(
                emb,
                m.heads,
                m.clusters,
                m.kmeans_samples,
                self.cfg.seed,
                self.n,
                l2_normalize=not pixels,
                init_heads=self.model.heads if m.kmeans_init_heads else None,
                niter=m.kmeans_iters,
                seeding=m.kmeans_seeding,
                tol=m.kmeans_tol,
            )
            record["event"] = f"init_{m.init}"
        else:
            local, st = sinkhorn_labels(
                self.model.heads,
                emb,
                m.lam,
                m.sinkhorn_tol,
                m.sinkhorn_max_iters,
                recompute=m.sinkhorn_logits == "recomputed",
            )
            record.update(
                event="relabel",
                sinkhorn_iters=max(st.iterations),
                sinkhorn_error=max(st.errors),
            )
        new = gather_bank(local, emb.idx, self.n, skipped=emb.skipped, fill=self.bank.labels)
        if emb.skipped:
            record["data_skipped"] = emb.skipped
        record["label_change"] = self.bank.assign(new)
        if self.runner is not None:  # DEC's stop rule: the same bank, so the same on all ranks
            record.update(self.runner.after_change(record["label_change"], initial))
        if self.ctx.rank == 0 and new.shape[0] > 1:  # rank 0 only: no collectives inside
            agree = head_agreement(new[:, :100_000].numpy())  # capped: 45 NMIs at N=1.28M stall
            record["head_agreement_nmi"] = agree["nmi_mean"]
            record["head_agreement_nmi_min"] = agree["nmi_min"]
        record["samples_seen"] = self.n
        sizes = self.bank.cluster_sizes()
        record["cluster_size_min"] = int(sizes.min())
        record["cluster_size_max"] = int(sizes.max())
        gt = C.all_gather_cat(torch.stack([emb.idx, emb.cls], 1))
        if (gt[:, 1] >= 0).all():  # ground truth known: evaluation only, never fed back
            y = torch.empty(self.n, dtype=torch.int64)
            y[gt[:, 0]] = gt[:, 1]
            record["pseudo_acc_head0"] = clustering_scores(y.numpy(), new[0].numpy())["acc"]
        self.log.log(record)

    def _manifold_now(self) -> bool:
        """Whether the label update at this step is one of the last ``manifold_relabels``."""
        schedule = sorted(self.relabel_at)
        later = len(schedule) - bisect.bisect_left(schedule, self.pos.global_step)
        return later <= self.cfg.method.manifold_relabels

    # ------------------------------------------------------------------ training
    def _method_step(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One DEC/DEPICT/DGG step; returns ``[total, *terms]`` (detached)."""
        assert self.runner is not None and isinstance(self.model, ClusterNet)
        # Dropout noise and DGG's z samples from a per-(step, rank) seed: exact on resume.
        torch.manual_seed((self.cfg.seed * 1_000_003 + self.pos.global_step) * 1009 + self.ctx.rank)
        images = images.to(self.ctx.device, non_blocking=True)
        x = self.model.inputs(images, self.size)
        if self.pos.phase == "pretrain":
            out = self.runner.pretrain_loss(x)
        else:
            labels = self.bank.lookup(idx)[0].to(self.ctx.device, non_blocking=True)
            noisy = None
            if self.cfg.method.noise_augment:  # DEPICT: an augmented view for the noisy path
                cfg = self.cfg
                noisy = self.model.augmented_inputs(
                    images, idx, cfg.augment, cfg.seed, self.pos.epoch, self.size
                )
            out = self.runner.cluster_loss(x, idx, labels, noisy)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self._average_gradients()
        if self.cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        zero = torch.zeros((), device=x.device)
        return torch.stack([out["loss"].detach(), *(out.get(t, zero) for t in self.terms)])

    def _average_gradients(self) -> None:
        """Mean gradient over ranks in one flat all-reduce (what DDP does in buckets).

        Parameters a phase does not use (the decoder while DEC clusters) have no gradient on
        any rank, so every rank sends the same list; the optimiser then leaves them alone.
        """
        if self.ctx.world_size == 1:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = C.all_reduce_sum(torch.cat([g.flatten() for g in grads]))
        flat /= self.ctx.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def train_step(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if self.runner is not None:
            return self._method_step(images, idx)
        images = images.to(self.ctx.device, non_blocking=True)
        if self.loader_augment is not None:  # already cropped and jittered by the loader
            x = normalize(images)
        else:
            x = augment(images, idx, cfg.augment, cfg.seed, self.pos.epoch, self.size)
        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        targets = self.bank.lookup(idx).to(self.ctx.device, non_blocking=True)  # [T, B] by idx
        with torch.autocast(
            self.ctx.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            out = self.ddp(x)
        losses = torch.stack(
            [F.cross_entropy(z.float(), t) for z, t in zip(out.logits, targets, strict=True)]
        )
        loss = losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return losses.detach()

    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        if ctx.checkpoint_dir:
            self.restore(ctx.checkpoint_dir)
        elif self.runner is None:
            self.relabel(initial=True)
        self.progress = Progress(self.total_steps, self.pos.global_step, enabled=ctx.rank == 0)
        every = cfg.checkpoint.every_steps
        while self.pos.epoch < self.epochs and not self._stopped():
            if self.pos.phase == "pretrain" and self.pos.epoch >= self.pretrain_epochs:
                self._start_clustering()
            batches = train_batches(
                self.shards,
                ctx.rank,
                ctx.world_size,
                self.local_batch,
                cfg.seed,
                self.pos.epoch,
                num_workers=self.loader_workers,
                shuffle_buffer=cfg.data.shuffle_buffer,
                skip_steps=self.pos.step_in_epoch,
                image_size=self.size,
                loader_augment=self.loader_augment,
                pin_memory=self.pin_memory,
            )
            for images, idx in batches:
                step = self.pos.global_step
                if step in self.relabel_at and self.pos.labels_step != step:
                    self.relabel()
                if self._stopped():
                    break
                self._check_preemption()
                losses = self.train_step(images, idx)
                self.window_loss += losses.cpu()
                self.window_n += 1
                self.pos.global_step += 1
                self.pos.step_in_epoch += 1
                if self.pos.global_step % cfg.trainer.log_every == 0:
                    self._log_train(self.window_loss / self.window_n, self._bad_data(batches))
                    self.window_loss.zero_()
                    self.window_n = 0
                if every and self.pos.global_step % every == 0:
                    if self.pos.step_in_epoch < self.steps_per_epoch:
                        self._check_finite(self.window_loss)
                        self.checkpoint({"kind": "step"})
            self.data_bad += C.all_reduce_sum(self._bad_data(batches))
            if self._stopped():  # DEC converged mid-epoch: the position stays where it stopped
                break
            self.pos.epoch += 1
            self.pos.step_in_epoch = 0
            self._check_finite(self.window_loss)
            self.checkpoint({"kind": "epoch"})
        return self.finish()

    def _stopped(self) -> bool:
        return self.runner is not None and self.runner.stopped

    def _start_clustering(self) -> None:
        """Pretraining → clustering: initialise from k-means on the embedding (a label pass),
        switch to the clustering optimiser; checkpointed with the labels (after_relabel)."""
        self.pos.phase = "cluster"
        self.pos.labels_step = self.pos.global_step
        self._build_optimizer()
        self.relabel(initial=True)

    def _check_preemption(self) -> None:
        """On Ray's preemption notice, checkpoint now (once), then keep training.

        When the node goes, Ray Train restarts the worker group from this checkpoint, so a
        reclaim with notice costs the restart, not the steps since the last checkpoint.
        """
        every = self.cfg.trainer.preemption_check_every
        if not every or self.pos.global_step % every or self.preemption_saved:
            return
        seen = self.ctx.preemption_seen()
        flag = torch.tensor([1.0 if seen is None or seen else 0.0])
        if not C.all_reduce_max(flag).item():  # µs over gloo; Ray's barrier only on a notice
            return
        info = self.ctx.preemption()
        if info is None:
            return
        self.preemption_saved = True
        self.log.log(
            {
                "step": self.pos.global_step,
                "epoch": self.pos.epoch,
                "event": "preemption_notice",
                "deadline_ms": info.get("deadline_ms"),
                "preempted_ranks": str(info.get("ranks")),
            }
        )
        if self.pos.step_in_epoch:  # (an epoch-start position was just checkpointed)
            self._check_finite(self.window_loss)
            self.checkpoint({"kind": "preemption"})

    def _check_finite(self, loss_sum: torch.Tensor) -> None:
        """Refuse to checkpoint a diverged model; all ranks agree (one all-reduce)."""
        bad = C.all_reduce_sum(torch.tensor([float(not torch.isfinite(loss_sum).all())]))
        if bad.item():
            raise FloatingPointError(
                f"loss became non-finite before step {self.pos.global_step} on {int(bad.item())} "
                "rank(s); the last good checkpoint is kept. Lower optim.lr or set optim.grad_clip"
            )

    @staticmethod
    def _bad_data(batches: Any) -> torch.Tensor:
        """This rank's bad-data counts in the epoch so far (summed over loader workers)."""
        st = batches.stats
        return torch.tensor([st.corrupt_images, st.missing_samples, len(st.bad_shards)])

    def _log_train(self, mean_losses: torch.Tensor, bad: torch.Tensor) -> None:
        # One all-reduce: the mean loss per head over ranks, and bad data in this epoch so far.
        t = len(mean_losses)
        both = C.all_reduce_sum(torch.cat([mean_losses.double(), bad.double()]))
        mean_losses = (both[:t] / self.ctx.world_size).float()
        bad_epoch = both[t:].long()
        if not torch.isfinite(mean_losses).all():
            raise FloatingPointError(
                f"loss became non-finite at step {self.pos.global_step}: "
                f"{mean_losses.tolist()}; lower optim.lr or set optim.grad_clip"
            )
        heads = self.cfg.method.heads
        terms = {
            f"loss_{name}": float(v)
            for name, v in zip(self.terms, mean_losses[heads:], strict=True)
        }
        mean_losses = mean_losses[:heads]
        self.head_loss = (
            0.9 * self.head_loss + 0.1 * mean_losses
            if self.head_loss.any()
            else (mean_losses.clone())
        )
        loss = float(mean_losses.mean())
        ips = self.progress.rate(self.pos.global_step, self.cfg.optim.batch_size)
        record: dict[str, Any] = {
            "step": self.pos.global_step,
            "epoch": self.pos.epoch,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "images_per_s": ips,
            **{f"loss_head{t}": float(v) for t, v in enumerate(mean_losses)},
            **terms,
        }
        if self.runner is not None:
            record["phase"] = self.pos.phase
        if bad_epoch.any():
            record.update(
                data_corrupt_images=int(bad_epoch[0]),
                data_missing_samples=int(bad_epoch[1]),
                data_bad_shards=int(bad_epoch[2]),
            )
        self.log.log(record)
        self.progress.line(self.pos.global_step, self.pos.epoch, self.epochs, loss, ips)

    # ------------------------------------------------------------------ the end
    def evaluate(self, shards: ShardSet) -> dict[str, Any]:
        """Network predictions on ``shards`` scored per head (all ranks get the result)."""
        self._sync_buffers()
        return score_model(
            self.model,
            shards,
            device=self.ctx.device,
            image_size=self.size,
            batch_size=max(self.local_batch, 256),
            loader_workers=self.loader_workers,
        )

    def finish(self) -> dict[str, Any]:
        cfg = self.cfg
        eval_shards = (
            self.shards
            if not cfg.data.eval
            else ShardSet.open(cfg.data.eval, cfg.data.io_timeout_s)
        )
        result = self.evaluate(eval_shards)
        # Best head chosen without ground truth: lowest training loss (as IIC picks its head).
        best = best_head(self.head_loss)
        summary: dict[str, Any] = {
            "best_head": best,
            "best_head_rule": BEST_HEAD_RULE,
            "heads": result["heads"],
            "steps": self.pos.global_step,
            "epochs": self.pos.epoch,
            "num_samples": result["num_samples"],
            "model_digest": model_digest(self.model),
            # bad data met in training over the run, all ranks (each encounter counted)
            "data_corrupt_images": int(self.data_bad[0]),
            "data_missing_samples": int(self.data_bad[1]),
            "data_bad_shards": int(self.data_bad[2]),
            "method": cfg.method.name,
        }
        if self.runner is not None:
            summary["pretrain_epochs"] = self.pretrain_epochs
            summary["stopped_early"] = self.runner.stopped  # DEC's tolerance was reached
        for key in ("acc", "nmi", "ari"):
            value = result["heads"][best].get(key)
            summary[key] = value if value is not None and math.isfinite(value) else None
        self.log.log(
            {
                "step": self.pos.global_step,
                "epoch": self.pos.epoch,
                "event": "final",
                **{k: summary[k] for k in ("acc", "nmi", "ari")},
            }
        )
        self.log.summary(summary)
        self.checkpoint({"kind": "final", "summary": summary})
        self.log.close()
        return summary


def train_loop(cfg: RunConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Train this rank to the end (or resume it) and return the run's summary."""
    configure_process(cfg)
    return Trainer(cfg, ctx).run()
