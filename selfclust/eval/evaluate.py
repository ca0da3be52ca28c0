"""``selfclust evaluate``: load a run's final checkpoint and score every head.

The scores themselves are :mod:`selfclust.eval.scoring`'s; this module adds the run-dir side:
which checkpoint, which data, the best head of the run, and each relabel's label change
(from ``metrics.jsonl``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch

from selfclust.checkpoint import read_state
from selfclust.config import RunConfig
from selfclust.data.shardset import ShardSet
from selfclust.eval.scoring import BEST_HEAD_RULE, best_head, score_model
from selfclust.methods.registry import build_model
from selfclust.models.base import image_side
from selfclust.models.selflabel import SelfLabelNet
from selfclust.rundir import is_checkpoint_dir, label_changes, resolve_checkpoint


def load_run(
    target: str | Path, data: str | None = None
) -> tuple[SelfLabelNet, RunConfig, Path, dict]:
    """A run dir (its final checkpoint) or a checkpoint dir → (model in eval mode, config,
    checkpoint path, state). ``data`` only sets the input channels when given."""
    ckpt = resolve_checkpoint(Path(target))
    state = read_state(ckpt)
    cfg = RunConfig.model_validate(state["config"])
    shards = ShardSet.open(data or cfg.data.eval or cfg.data.train, cfg.data.io_timeout_s)
    model = build_model(cfg, shards.channels, image_side(cfg.data.image_size, shards.image))
    model.load_state_dict(state["model"], strict=True)
    # DEC/DEPICT/DGG nets (ClusterNet) offer SelfLabelNet's evaluation interface: backbone,
    # heads, forward → NetOutput (not stage_features: `selfclust probe` is SeLa's).
    return cast(SelfLabelNet, model.eval()), cfg, ckpt, state


def evaluate(target: str | Path, data: str | None = None, batch_size: int = 512) -> dict[str, Any]:
    """Load a run dir's final checkpoint (or a checkpoint dir) and score every head."""
    target = Path(target)
    model, cfg, ckpt, state = load_run(target, data)
    shards = ShardSet.open(data or cfg.data.eval or cfg.data.train, cfg.data.io_timeout_s)
    result = score_model(
        model,
        shards,
        device=torch.device("cpu"),
        image_size=cfg.data.image_size,
        batch_size=batch_size,
    )
    best = best_head(state["extra"]["head_loss"])
    result.update(
        checkpoint=str(ckpt.resolve()),
        data=str(shards.root),
        best_head=best,
        best_head_rule=BEST_HEAD_RULE,
    )
    for key in ("acc", "nmi", "ari"):
        result[key] = result["heads"][best].get(key)
    # Never write into a checkpoint dir: Ray prunes those (keep_last).
    is_ckpt = is_checkpoint_dir(target)
    if not is_ckpt:
        result["label_change"] = label_changes(target)
    result["default_out"] = Path("evaluation.json") if is_ckpt else target / "evaluation.json"
    return result
