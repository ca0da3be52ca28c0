"""Scoring a model's clusters against ground truth, in training and from ``selfclust evaluate``.

Per head: NMI, ARI, ACC (Hungarian), and — the fair scores when K ≠ number of classes —
majority-vote accuracy and adjusted mutual information (AMI); cluster sizes (min, max,
normalised entropy); agreement between heads (pairwise NMI/ARI); and, from a run dir's
``metrics.jsonl``, the fraction of labels changed at each relabel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch

from selfclust import collectives as C
from selfclust.checkpoint import read_state
from selfclust.config import RunConfig
from selfclust.data.streams import ShardSet, eval_batches
from selfclust.eval.metrics import clustering_scores, head_agreement, size_stats
from selfclust.labels.label_pass import embed, predictions
from selfclust.methods.nets import ClusterNet
from selfclust.models.selflabel import SelfLabelNet, build_model, image_side


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
                    transform=model.inputs)  # fmt: skip
    else:
        emb = embed(model.backbone, batches, device, image_size, shards.num_samples)
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


def load_run(
    target: str | Path, data: str | None = None
) -> tuple[SelfLabelNet, RunConfig, Path, dict]:
    """A run dir (its final checkpoint) or a checkpoint dir → (model in eval mode, config,
    checkpoint path, state). ``data`` only sets the input channels when given."""
    from selfclust.launch import latest_checkpoint

    target = Path(target)
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist: give a run dir or a checkpoint dir")
    ckpt = target if (target / "state.pt").is_file() else latest_checkpoint(target)
    state = read_state(ckpt)
    cfg = RunConfig.model_validate(state["config"])
    shards = ShardSet.open(data or cfg.data.eval or cfg.data.train, cfg.data.io_timeout_s)
    model = build_model(cfg, shards.channels, image_side(cfg.data.image_size, shards.image))
    model.load_state_dict(state["model"], strict=True)
    # DEC/DEPICT/DGG nets (ClusterNet) offer SelfLabelNet's evaluation interface: backbone,
    # heads, forward → NetOutput (not stage_features: `selfclust probe` is SeLa's).
    return cast(SelfLabelNet, model.eval()), cfg, ckpt, state


def label_changes(run_dir: Path) -> list[dict[str, Any]]:
    """``label_change`` of every label update logged in ``metrics.jsonl`` (last attempt wins
    for steps repeated after a restart)."""
    import json

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    seen: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "label_change" in rec:
            seen[int(rec["step"])] = {
                "step": int(rec["step"]),
                "event": rec.get("event"),
                "label_change": rec["label_change"],
            }
    return [seen[k] for k in sorted(seen)]


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
    best = int(torch.argmin(state["extra"]["head_loss"]).item())
    result.update(
        checkpoint=str(ckpt.resolve()),
        data=str(shards.root),
        best_head=best,
        best_head_rule="lowest running training loss (no ground truth used)",
    )
    for key in ("acc", "nmi", "ari"):
        result[key] = result["heads"][best].get(key)
    # Never write into a checkpoint dir: Ray prunes those (keep_last).
    is_ckpt = (target / "state.pt").is_file()
    if not is_ckpt:
        result["label_change"] = label_changes(target)
    result["default_out"] = Path("evaluation.json") if is_ckpt else target / "evaluation.json"
    return result
