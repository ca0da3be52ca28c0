"""Full-state checkpoints: everything needed to continue a run exactly (bit for bit on CPUs;
on GPUs cuDNN and float atomics vary from run to run).

A checkpoint is a directory holding ``state.pt`` (a dict of plain tensors and Python scalars,
loadable with ``torch.load(weights_only=True)``): model, optimizer, LR scheduler, label bank,
progress (epoch, step within the epoch, global step), the resolved config and the W&B run id.
Rank 0 writes it into a fresh temporary directory and hands it to Ray
(``ray.train.report(checkpoint=...)``), which registers it only once it is fully persisted.
``state.pt`` is written under a temporary name and renamed, and ``state.sha256`` (its digest)
is written last: a directory without a matching digest (a write or an upload cut off
half-way) is never loaded, and never chosen as the latest checkpoint.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from selfclust.config import RunConfig, diff_configs
from selfclust.errors import UserError

STATE_FILE = "state.pt"
DIGEST_FILE = "state.sha256"
FORMAT = 1
# Sections that must match for a checkpoint to be continued (the rest is how it is run).
SECTIONS_FIXED = ("seed", "data", "model", "method", "augment", "optim")


@dataclass
class Position:
    """Where training is: ``epoch`` and ``step_in_epoch`` name the next batch to train on."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    # The global step whose scheduled label update is already in the bank (-1: none yet), so
    # a checkpoint taken right after an update is resumed without redoing it.
    labels_step: int = -1


class IncompatibleCheckpoint(UserError, ValueError):
    pass


def check_compatible(saved: dict[str, Any], current: RunConfig, where: str) -> None:
    """Refuse to continue a checkpoint whose run-defining config differs; name the keys."""
    now = current.to_dict()
    try:  # keys added to selfclust since the checkpoint was written take their defaults
        saved = RunConfig.model_validate(saved).to_dict()
    except ValueError:
        pass  # a key since removed or renamed: compare as written (the diff names it)
    diffs: list[str] = []
    for key in SECTIONS_FIXED:
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += diff_configs(a, b, key + ".")
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    if diffs:
        raise IncompatibleCheckpoint(
            f"{where} belongs to a run with another config; these keys differ "
            f"(checkpoint -> now):\n  " + "\n  ".join(diffs) + "\nUse a new --run-dir for a new "
            "run, or restore the old values to continue this one."
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def write_state(state: dict[str, Any]) -> str:
    """Write ``state`` to a new temporary directory (rank 0 only) and return its path."""
    tmp = Path(tempfile.mkdtemp(prefix="selfclust-ckpt-"))
    part = tmp / (STATE_FILE + ".partial")
    torch.save(state, part)
    part.rename(tmp / STATE_FILE)  # atomic within the directory
    digest = tmp / (DIGEST_FILE + ".partial")
    digest.write_text(_sha256(tmp / STATE_FILE) + "\n")
    digest.rename(tmp / DIGEST_FILE)
    return str(tmp)


def is_complete(checkpoint_dir: str | Path) -> bool:
    """True when the directory holds a state file matching its digest (fully written)."""
    d = Path(checkpoint_dir)
    state, digest = d / STATE_FILE, d / DIGEST_FILE
    if not (state.is_file() and digest.is_file()):
        return False
    return digest.read_text().strip() == _sha256(state)


def read_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir} holds no {STATE_FILE}: not a selfclust checkpoint"
        )
    if not is_complete(checkpoint_dir):
        raise IncompatibleCheckpoint(
            f"{checkpoint_dir} is incomplete or corrupt ({STATE_FILE} does not match "
            f"{DIGEST_FILE}): it was cut off while being written or copied; use an older "
            "checkpoint (the run dir's latest complete one is found automatically)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise IncompatibleCheckpoint(
            f"{path} has checkpoint format {state.get('format')!r}; this selfclust reads {FORMAT}"
        )
    return state


def make_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    bank_state: dict[str, Any],
    position: Position,
    cfg: RunConfig,
    wandb_id: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "bank": bank_state,
        "position": asdict(position),
        "config": cfg.to_dict(),
        "wandb_id": wandb_id,
        "extra": extra or {},
    }
