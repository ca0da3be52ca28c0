"""What the loop logs: the training lines, the label-update lines, and the final summary.

Each builder takes the loop's state and returns a plain dict for ``metrics.jsonl`` / W&B;
the collectives they contain are called by every rank.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch

from selfclust import collectives as C
from selfclust.data.shardset import ShardSet
from selfclust.errors import UserError
from selfclust.eval.metrics import clustering_scores, head_agreement
from selfclust.eval.scoring import BEST_HEAD_RULE, best_head, score_model
from selfclust.labels.bank import LabelBank
from selfclust.labels.label_pass import Embedded
from selfclust.models.base import model_digest
from selfclust.train.batches import sync_buffers

if TYPE_CHECKING:
    from selfclust.train.loop import Trainer


class NonFiniteLoss(UserError, FloatingPointError):
    """The loss diverged: at these settings it diverges again on every restart."""


def check_finite(loss_sum: torch.Tensor, step: int) -> None:
    """Refuse to checkpoint a diverged model; all ranks agree (one all-reduce)."""
    bad = C.all_reduce_sum(torch.tensor([float(not torch.isfinite(loss_sum).all())]))
    if bad.item():
        raise NonFiniteLoss(
            f"loss became non-finite before step {step} on {int(bad.item())} "
            "rank(s); the last good checkpoint is kept. Lower optim.lr or set optim.grad_clip"
        )


def train_record(
    tr: Trainer, mean_losses: torch.Tensor, bad: torch.Tensor, ips: float
) -> dict[str, Any]:
    """A training line: the window's mean loss per head and per term over ranks, the LR,
    images/s, and bad data in this epoch so far (one all-reduce); updates the best-head EMA."""
    t = len(mean_losses)
    both = C.all_reduce_sum(torch.cat([mean_losses.double(), bad.double()]))
    mean_losses = (both[:t] / tr.ctx.world_size).float()
    bad_epoch = both[t:].long()
    step = tr.pos.global_step
    if not torch.isfinite(mean_losses).all():
        raise NonFiniteLoss(
            f"loss became non-finite at step {step}: "
            f"{mean_losses.tolist()}; lower optim.lr or set optim.grad_clip"
        )
    heads = tr.cfg.method.heads
    terms = {
        f"loss_{name}": float(v)
        for name, v in zip(tr.method.terms, mean_losses[heads:], strict=True)
    }
    mean_losses = mean_losses[:heads]
    tr.losses.update_heads(mean_losses)
    record: dict[str, Any] = {
        "step": step,
        "epoch": tr.pos.epoch,
        "loss": float(mean_losses.mean()),
        "lr": tr.scheduler.get_last_lr()[0],
        "images_per_s": ips,
        **{f"loss_head{t}": float(v) for t, v in enumerate(mean_losses)},
        **terms,
    }
    if len(tr.method.phases) > 1:
        record["phase"] = tr.pos.phase
    if bad_epoch.any():
        record.update(
            data_corrupt_images=int(bad_epoch[0]),
            data_missing_samples=int(bad_epoch[1]),
            data_bad_shards=int(bad_epoch[2]),
        )
    return record


def label_record(
    record: dict[str, Any],
    new: torch.Tensor,
    bank: LabelBank,
    emb: Embedded,
    rank: int,
    started: float,
) -> dict[str, Any]:
    """A label update's line: agreement between heads, cluster sizes, when ground truth is
    known head 0's pseudo-label accuracy (evaluation only, never fed back), and the update's
    duration in seconds (``label_seconds``: this rank's, since ``started``, a
    ``time.perf_counter()``)."""
    n = bank.labels.shape[1]
    if rank == 0 and new.shape[0] > 1:  # rank 0 only: no collectives inside
        agree = head_agreement(new[:, :100_000].numpy())  # capped: 45 NMIs at N=1.28M stall
        record["head_agreement_nmi"] = agree["nmi_mean"]
        record["head_agreement_nmi_min"] = agree["nmi_min"]
    record["samples_seen"] = n
    sizes = bank.cluster_sizes()
    record["cluster_size_min"] = int(sizes.min())
    record["cluster_size_max"] = int(sizes.max())
    gt = C.all_gather_cat(torch.stack([emb.idx, emb.cls], 1))
    if (gt[:, 1] >= 0).all():
        y = torch.empty(n, dtype=torch.int64)
        y[gt[:, 0]] = gt[:, 1]
        record["pseudo_acc_head0"] = clustering_scores(y.numpy(), new[0].numpy())["acc"]
    record["label_seconds"] = time.perf_counter() - started
    return record


def final_summary(tr: Trainer) -> dict[str, Any]:
    """The run's summary: every head scored on ``data.eval`` (default: the training shards;
    collective, BatchNorm statistics synced first), the best head chosen without ground
    truth, the digest, bad data met."""
    cfg = tr.cfg
    shards = ShardSet.open(cfg.data.eval, cfg.data.io_timeout_s) if cfg.data.eval else tr.shards
    sync_buffers(tr.model)
    refit: dict[str, Any] = {}
    if tr.method.refits_heads:  # a label pass, then the heads re-set (SeLa's final_refine)
        refit = tr.method.refit_heads(tr.method.embed(tr.data.label_pass(tr.model), tr.n, False))
    result = score_model(
        tr.model,
        shards,
        device=tr.ctx.device,
        image_size=tr.size,
        batch_size=tr.data.eval_batch,
        loader_workers=tr.data.loader_workers,
    )
    best = best_head(tr.losses.head_loss)
    summary: dict[str, Any] = {
        "best_head": best,
        "best_head_rule": BEST_HEAD_RULE,
        "heads": result["heads"],
        "steps": tr.pos.global_step,
        "epochs": tr.pos.epoch,
        "num_samples": result["num_samples"],
        "model_digest": model_digest(tr.model),
        **tr.health.summary(),
        "method": tr.cfg.method.name,
        **tr.method.summary(),
        **refit,
    }
    for key in ("acc", "nmi", "ari"):
        value = result["heads"][best].get(key)
        summary[key] = value if value is not None and math.isfinite(value) else None
    return summary
