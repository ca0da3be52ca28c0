"""Scoring a model's clusters against ground truth: collective, used by training and by
``selfclust evaluate``.

Per head: NMI, ARI, ACC (Hungarian), and — the fair scores when K ≠ number of classes —
majority-vote accuracy and adjusted mutual information (AMI); cluster sizes (min, max,
normalised entropy); agreement between heads (pairwise NMI/ARI).
"""

from __future__ import annotations

from typing import Any, cast

import torch

from selfclust import collectives as C
from selfclust.data.shardset import ShardSet
from selfclust.data.streams import eval_batches
from selfclust.eval.metrics import clustering_scores, head_agreement, size_stats
from selfclust.labels.label_pass import embed, predictions
from selfclust.methods.nets import ClusterNet
from selfclust.models.selflabel import SelfLabelNet

BEST_HEAD_RULE = "lowest running training loss (no ground truth used)"


def best_head(head_loss: torch.Tensor | None) -> int:
    """The head reported as the run's result, chosen without ground truth: the lowest running
    training loss (as IIC picks its head); head 0 before any loss was logged."""
    if head_loss is None or not head_loss.any():
        return 0
    return int(torch.argmin(head_loss).item())


def score_model(
    model: SelfLabelNet | ClusterNet,
    shards: ShardSet,
    *,
    device: torch.device,
    image_size: int | None,
    batch_size: int,
    loader_workers: int = 0,
) -> dict[str, Any]:
    """Network predictions (argmax per head) on every sample, scored per head on all ranks.

    Collective: every rank embeds its own shards; only ``[n_r, 2 + T]`` integers (idx, class,
    one prediction per head) are all-gathered.
    """
    batches = eval_batches(
        shards, C.rank(), C.world_size(), batch_size, loader_workers, image_size=image_size
    )
    if isinstance(model, ClusterNet):  # DEC/DEPICT/DGG: embedded exactly as in training
        emb = embed(model.features, batches, device, image_size, shards.num_samples,
                    group=C.WORLD, transform=model.inputs)  # fmt: skip
    else:
        emb = embed(model.backbone, batches, device, image_size, shards.num_samples, group=C.WORLD)
    pred = predictions(model.heads, emb)  # [T, n_r]
    rows = C.all_gather_cat(torch.cat([emb.idx[:, None], emb.cls[:, None], pred.t()], 1))
    rows = rows[torch.argsort(rows[:, 0])]
    y, preds = rows[:, 1].numpy(), rows[:, 2:].t().numpy()
    labelled = bool((y >= 0).all())
    clusters = (
        model.clusters
        if isinstance(model, ClusterNet)
        else int(cast(torch.nn.Linear, model.heads[0]).out_features)
    )
    heads: list[dict[str, Any]] = []
    for t, p in enumerate(preds):
        entry: dict[str, Any] = {"head": t, **size_stats(p, clusters)}
        if labelled:
            entry.update(clustering_scores(y, p))
        heads.append(entry)
    out: dict[str, Any] = {
        "heads": heads,
        "num_samples": int(len(y)),
        "has_labels": labelled,
        "clusters": clusters,
        "head_agreement": head_agreement(preds),
    }
    if labelled:
        out["num_classes"] = int(len(set(y.tolist())))
        out["k_equals_classes"] = out["num_classes"] == clusters
    return out
