"""``selfclust export``: a trained model in a file that other code loads without selfclust's
training stack.

An export is one ``torch.save`` file of plain tensors and Python values (``torch.load(...,
weights_only=True)`` reads it):

* ``backbone``: for SeLa's torchvision ResNets, a state dict that ``torchvision.models.
  resnet18()`` / ``resnet50()`` loads strictly once ``fc`` is ``nn.Identity()`` (and, for
  ``small_stem`` or non-RGB input, ``conv1`` / ``maxpool`` are swapped as
  :func:`torchvision_backbone` does); for the narrow ``small_resnet``, the state dict of
  :class:`~selfclust.models.selflabel.SmallResNet`. DEC, DEPICT and DGG store their whole
  network under ``model`` instead (rebuilt from ``identity.config``).
* ``heads``: SeLa's clustering heads as ``weight [T, K, D]`` and ``bias [T, K]``; ``best_head``
  is the head the run reports (lowest training loss, no ground truth).
* ``preprocess``: how uint8 images become the network's input (side, channels, mean, std).
* ``identity``: which run and step it came from, the model digest and the run-defining part of
  the config. Paths of the training machine (data, storage) and every how-to-run section
  (workers, W&B, Ray) are left out, so the file holds no secret and no local path.

:func:`selfclust.exported.load_backbone` and :func:`~selfclust.exported.load_model` rebuild
the networks in eval mode.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfclust.errors import UserError

FORMAT = "selfclust-export/1"
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25  # as selfclust.data.augment.normalize
# The config sections that define the model; data keeps only its image keys.
_IDENTITY_SECTIONS = ("seed", "model", "method", "augment", "optim")
_DATA_KEYS = ("image_size",)
TORCHVISION_ARCHS = ("resnet18", "resnet50")


class ExportError(UserError, ValueError):
    """A checkpoint that cannot be exported (config or weights this selfclust cannot rebuild)."""


def _identity_config(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: config[k] for k in _IDENTITY_SECTIONS if k in config}
    out["data"] = {k: v for k, v in config.get("data", {}).items() if k in _DATA_KEYS}
    return out


def export_state(target: str | Path) -> dict[str, Any]:
    """The export of a run dir's final checkpoint (or of the checkpoint dir given), in memory."""
    from selfclust.checkpoint import read_state
    from selfclust.config import RunConfig
    from selfclust.models.base import model_digest
    from selfclust.rundir import RUN_FILE, read_json, resolve_checkpoint

    ckpt = resolve_checkpoint(Path(target))
    state = read_state(ckpt)
    try:
        cfg = RunConfig.model_validate(state["config"])
    except ValueError as e:
        first = str(e).splitlines()[0]
        raise ExportError(
            f"{ckpt} was written by a selfclust whose config this one cannot read ({first}); "
            "export it with the selfclust version that trained it"
        ) from None
    model, side, channels = _rebuild(cfg, state["model"], where=str(ckpt))
    run_file = Path(target) / RUN_FILE
    run = read_json(run_file) if run_file.is_file() else {}
    head_loss = state.get("extra", {}).get("head_loss")
    from selfclust.eval.scoring import best_head

    out: dict[str, Any] = {
        "format": FORMAT,
        "method": cfg.method.name,
        "arch": cfg.model.arch if cfg.method.name == "sela" else cfg.method.name,
        "preprocess": preprocess_spec(side, channels),
        "best_head": best_head(head_loss),
        "head_loss": [] if head_loss is None else [float(v) for v in head_loss],
        "identity": {
            "run_name": run.get("name"),
            "wandb_id": state.get("wandb_id"),
            "checkpoint": ckpt.name,
            "position": state.get("position", {}),
            "model_digest": model_digest(model),
            "config": _identity_config(cfg.to_dict()),
            "selfclust_version": _version(),
            "torch_version": str(torch.__version__),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    if cfg.method.name == "sela":
        out["small_stem"] = bool(cfg.model.small_stem)
        out["widths"] = list(cfg.model.widths)
        sd = model.state_dict()
        out["backbone"] = {
            k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")
        }
        t = cfg.method.heads
        out["heads"] = {
            "weight": torch.stack([sd[f"heads.{i}.weight"] for i in range(t)]),
            "bias": torch.stack([sd[f"heads.{i}.bias"] for i in range(t)]),
        }
    else:
        out["model"] = model.state_dict()
    return out


def _version() -> str:
    from selfclust import __version__

    return __version__


def _rebuild(cfg: Any, weights: dict[str, torch.Tensor], where: str) -> tuple[nn.Module, Any, int]:
    """The checkpoint's network with its weights, its input side and channels."""
    from selfclust.methods.registry import build_model

    channels, side = _input_shape(cfg, weights)
    model = build_model(cfg, channels, side)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ExportError(
            f"{where}: its weights do not fit the network its config describes ({first}); "
            "the checkpoint comes from another architecture or selfclust version"
        ) from None
    return model.eval(), side, channels


def _input_shape(cfg: Any, weights: dict[str, torch.Tensor]) -> tuple[int, int | None]:
    """Channels and side of the images the network was trained on: from the run's shards
    (as ``selfclust evaluate`` reads them), else from the weights' first layer."""
    from selfclust.data.shardset import ShardSet
    from selfclust.models.base import image_side

    try:
        shards = ShardSet.open(cfg.data.eval or cfg.data.train, cfg.data.io_timeout_s)
    except (OSError, ValueError):  # moved or deleted since training: read the weights
        shards = None
    if shards is not None:
        return shards.channels, image_side(cfg.data.image_size, shards.image)
    first = next(v for k, v in weights.items() if k.endswith("weight") and v.ndim >= 2)
    if first.ndim == 4:  # a ResNet's or DEPICT's first convolution: [out, C, k, k]
        return int(first.shape[1]), cfg.data.image_size
    width = int(first.shape[1])  # an MLP's input: C * side * side
    side = cfg.data.image_size or round(width**0.5)
    channels = width // (side * side)
    if channels * side * side != width:
        raise ExportError(
            f"cannot tell the image shape of this {cfg.method.name} network (input width "
            f"{width}) without its shards ({cfg.data.train}): export where they are readable"
        )
    return channels, side


def preprocess_spec(side: int | None, channels: int) -> dict[str, Any]:
    return {
        "image_size": side,
        "channels": channels,
        "mean": [PIXEL_MEAN] * channels,
        "std": [PIXEL_STD] * channels,
        "scale": 1 / 255,
        "resize": "bilinear",
        "input": "uint8 [B, C, H, W] scaled to [0, 1], resized to image_size x image_size "
        "(bilinear), then (x - mean) / std per channel",
    }


def write_export(target: str | Path, out: str | Path) -> dict[str, Any]:
    """``selfclust export``: write :func:`export_state` of ``target`` to ``out`` atomically."""
    export = export_state(target)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".partial")
    torch.save(export, part)
    part.replace(out)
    return export
