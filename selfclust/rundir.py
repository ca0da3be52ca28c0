"""The run directory: everything selfclust knows about the files of ``--run-dir``.

A run dir holds ``run.json`` (the persistent identity: Ray run name, W&B id, config),
``config.yaml`` (the resolved config, for people), ``metrics.jsonl`` (one JSON object per line,
written by :class:`selfclust.runlog.MetricsLog`), ``summary.json`` (written at the end, naming
the final checkpoint), ``shards/`` (built-in data sharded on first use) and ``ray/`` (Ray's
storage, holding the checkpoints). Every file here is written atomically (temp + rename), so a
crash never leaves a half-written one behind.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml

from selfclust.checkpoint import DIGEST_FILE, STATE_FILE, check_compatible, is_complete
from selfclust.config import RunConfig
from selfclust.errors import UserError

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=2))


def is_checkpoint_dir(path: Path) -> bool:
    """A checkpoint dir (holds ``state.pt``) rather than a run dir."""
    return (path / STATE_FILE).is_file()


def default_run_dir(config: str | Path) -> Path:
    """The run dir of ``selfclust train CONFIG`` without ``--run-dir``: ``runs/CONFIG_NAME``."""
    return Path("runs") / Path(config).stem


def default_output(target: Path, name: str) -> Path:
    """Where a command run on ``target`` writes ``name`` by default: into the run dir, or into
    the working directory when ``target`` is a checkpoint dir (a checkpoint is never written)."""
    return Path(name) if is_checkpoint_dir(target) else target / name


class DamagedRunFile(UserError, ValueError):
    """A run dir's JSON file that does not parse: edited by hand, or cut off by a full disk."""


# What to do about each damaged file (the checkpoints under RUN_DIR/ray are separate).
_DAMAGED_HELP = {
    RUN_FILE: "restore it (it holds the run's name and config), or train in a new --run-dir",
    SUMMARY_FILE: "delete it: the final checkpoint is then found under RUN_DIR/ray",
}


def read_json(path: Path) -> dict[str, Any]:
    """A run dir's JSON object, or :class:`DamagedRunFile` naming the file and what to do."""
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        problem = f"is not valid JSON ({e})"
    else:
        if isinstance(obj, dict):
            return obj
        problem = f"holds a JSON {type(obj).__name__}, not an object"
    raise DamagedRunFile(f"{path} {problem}: {_DAMAGED_HELP.get(path.name, 'remove it')}")


def run_identity(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """Load or create ``run.json``: the Ray run name and W&B id that persist across reruns.

    A run dir that already belongs to a run with another config is refused, naming the keys.
    """
    path = run_dir / RUN_FILE
    if path.is_file():
        info = read_json(path)
        check_compatible(info.get("config", {}), cfg, f"run dir {run_dir}")
        info["config"] = cfg.to_dict()  # how-to-run keys (workers, logging) may change
    else:
        if run_dir.exists() and any(p.name != "shards" for p in run_dir.iterdir()):
            raise FileExistsError(
                f"run dir {run_dir} is not empty and holds no {RUN_FILE}: it is not a selfclust "
                "run; choose an empty or new --run-dir"
            )
        token = uuid.uuid4().hex[:8]
        info = {"name": f"selfclust-{token}", "wandb_id": f"sc{token}", "config": cfg.to_dict()}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(info, indent=2))
    atomic_write(run_dir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return info


def read_identity(run_dir: Path) -> tuple[dict[str, Any], RunConfig]:
    """``run.json`` and the config of ``config.yaml`` of an existing run dir."""
    info = read_json(run_dir / RUN_FILE)
    path = run_dir / CONFIG_FILE
    try:
        cfg = RunConfig.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        first = str(e).splitlines()[0]
        raise DamagedRunFile(
            f"{path} is not a selfclust config ({first}): restore it from {RUN_FILE}'s "
            '"config", or train in a new --run-dir'
        ) from None
    return info, cfg


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that already ended, if its final checkpoint is intact.

    Rerunning a finished command then costs no Ray cluster; a run whose final checkpoint went
    missing or is damaged is trained (resumed) again instead.
    """
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    summary = read_json(path)
    checkpoint = summary.get("checkpoint")
    return summary if checkpoint and is_complete(Path(checkpoint)) else None


def latest_checkpoint(run_dir: Path) -> Path:
    """The final checkpoint recorded in summary.json, else the newest complete one in storage.

    Incomplete directories (a write or an upload cut off half-way) are never chosen.
    """
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        recorded = read_json(summary).get("checkpoint")
        if recorded and is_complete(Path(recorded)):
            return Path(recorded)
    roots = [run_dir / "ray"]
    info_file = run_dir / RUN_FILE
    if info_file.is_file():
        info = read_json(info_file)
        storage = (info.get("config", {}).get("ray") or {}).get("storage_path")
        if storage and "://" not in storage:
            roots.insert(0, Path(storage))
    found = [
        p.parent
        for root in roots
        for p in root.glob(f"*/checkpoint_*/{STATE_FILE}")
        if is_complete(p.parent)
    ]
    if not found:
        raise FileNotFoundError(
            f"{run_dir} holds no complete checkpoint (no {SUMMARY_FILE}, nothing complete under "
            + ", ".join(str(r) for r in roots)
            + ")"
        )
    return max(found, key=lambda d: (d / DIGEST_FILE).stat().st_mtime)


def resolve_checkpoint(target: Path) -> Path:
    """A checkpoint dir as given, or a run dir's :func:`latest_checkpoint`."""
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist: give a run dir or a checkpoint dir")
    return target if is_checkpoint_dir(target) else latest_checkpoint(target)


def label_changes(run_dir: Path) -> list[dict[str, Any]]:
    """``label_change`` of every label update logged in ``metrics.jsonl`` (last attempt wins
    for steps repeated after a restart)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    seen: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut off by a crash: the lines after it are whole
            continue
        if "label_change" in rec:
            seen[int(rec["step"])] = {
                "step": int(rec["step"]),
                "event": rec.get("event"),
                "label_change": rec["label_change"],
            }
    return [seen[k] for k in sorted(seen)]
