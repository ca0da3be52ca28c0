"""The probe protocol: linear probes on frozen features, per ResNet stage, and weighted k-NN.

Protocol (SeLa's per-layer tables; DINO / SwAV linear evaluation, sized for frozen features):

* Features and their light augmentation: :mod:`selfclust.eval.features`.
* Heads, their training and scoring: :mod:`selfclust.eval.probe` (:class:`ProbeConfig`).
* Split: the ``--eval-data`` shards when given; otherwise a fixed stratified split of the data
  (sklearn ``train_test_split``, ``random_state=seed``), stated in the output.
* k-NN on the final pool: :mod:`selfclust.eval.knn`.

Distributed: each rank embeds only its own shards; every step is a collective, so all ranks
call these functions together and get the same result, whatever their number (up to float
summation order).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from selfclust import collectives as C
from selfclust.config import AugmentConfig
from selfclust.data.shardset import ShardSet
from selfclust.eval.features import Features, extract, stratified_split
from selfclust.eval.knn import knn_accuracy
from selfclust.eval.probe import ProbeConfig, score_linear, train_linear
from selfclust.models.selflabel import SelfLabelNet


def probe_features(
    train: Features, test: Features, num_classes: int, cfg: ProbeConfig, group: C.Group
) -> dict[str, Any]:
    """Linear probes per stage and k-NN on the final pool, from already extracted features.
    Collective over ``group``."""
    heads = train_linear(train, num_classes, cfg, group)
    knn = knn_accuracy(
        train.stages["pool"][0],
        train.cls,
        test.stages["pool"][0],
        test.cls,
        num_classes,
        ks=cfg.knn_k,
        temperature=cfg.knn_temperature,
        group=group,
    )
    n = C.all_reduce_sum(torch.tensor([len(train.idx), len(test.idx)]), group)
    return {
        "linear": score_linear(heads, test, group),
        "knn": knn,
        "num_train": int(n[0]),
        "num_eval": int(n[1]),
        "num_classes": num_classes,
    }


def probe_model(
    model: SelfLabelNet,
    data: ShardSet,
    eval_data: ShardSet | None,
    cfg: ProbeConfig,
    *,
    image_size: int | None,
    batch_size: int = 256,
    device: torch.device | None = None,
    group: C.Group,
) -> dict[str, Any]:
    """Extract features (per rank), split if needed, train and score the probes and k-NN.
    Collective over ``group``."""
    aug = AugmentConfig(
        crop_scale=(cfg.crop_scale, 1.0),
        rotation=0,
        hflip=cfg.hflip or 0.0,
        jitter_p=0,
        grayscale=0,
    )
    kw = dict(
        aug=aug,
        seed=cfg.seed,
        image_size=image_size,
        batch_size=batch_size,
        device=device,
        group=group,
    )
    train = extract(model, data, views=cfg.views, **kw)  # type: ignore[arg-type]
    if eval_data is not None:
        test = extract(model, eval_data, views=1, **kw)  # type: ignore[arg-type]
        split = f"train: {data.root}; evaluation: {eval_data.root}"
    else:
        is_test = stratified_split(train.idx, train.cls, cfg.eval_fraction, cfg.seed, group)
        train, test = train.rows(~is_test), train.rows(is_test, views=1)
        split = (
            f"no evaluation shards given: fixed stratified split of {data.root}, "
            f"{1 - cfg.eval_fraction:.0%} train / {cfg.eval_fraction:.0%} evaluation "
            f"(sklearn train_test_split, random_state={cfg.seed}, by global sample index)"
        )
    labelled = C.all_reduce_sum(
        torch.tensor([int((train.cls < 0).sum() + (test.cls < 0).sum())]), group
    )
    if int(labelled):
        raise ValueError(
            "linear probes and k-NN need class labels in the shards (cls); these have none"
        )
    top = max([int(t.cls.max()) for t in (train, test) if len(t.cls)], default=-1)
    num_classes = int(C.all_reduce_max(torch.tensor([top]), group)) + 1
    result = probe_features(train, test, num_classes, cfg, group)
    result.update(split=split, protocol=asdict(cfg))
    return result
