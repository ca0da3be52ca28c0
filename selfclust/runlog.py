"""Rank-0 metrics: ``metrics.jsonl`` in the run dir, Weights & Biases, and progress events.

W&B runs offline by default (``wandb/offline-run-*`` in the run dir, uploadable later with
``wandb sync``); ``online`` needs ``WANDB_API_KEY`` in the environment, which is never read,
logged or stored by selfclust itself. The run id is persistent (kept in ``run.json`` and the
checkpoint) so a resumed run continues the same W&B run, with an explicit global ``step``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from selfclust.config import RunConfig
from selfclust.console import event_line

_log = logging.getLogger("selfclust")


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _wandb_allowed(cfg: RunConfig) -> bool:
    """Online mode needs ``WANDB_API_KEY`` in the environment (never read by selfclust)."""
    return cfg.wandb.mode != "online" or bool(os.environ.get("WANDB_API_KEY"))


def _wandb_run(cfg: RunConfig, wandb_id: str, run_dir: Path, **kwargs: Any) -> Any:
    """The run's W&B run, resumed by its persistent id: the only ``wandb.init`` of selfclust."""
    import wandb

    return wandb.init(
        project=cfg.wandb.project,
        id=wandb_id,
        resume="allow",
        mode=cfg.wandb.mode,
        dir=str(run_dir),
        settings=wandb.Settings(console="off", silent=True),
        **kwargs,
    )


def log_images(
    run_dir: Path, cfg: RunConfig, wandb_id: str, paths: dict[str, Path], step: int
) -> str:
    """Log PNGs to the run's W&B run (under ``pictures/``); returns what was done, in words.
    Online mode without ``WANDB_API_KEY`` is skipped, never an error after a finished run."""
    mode = cfg.wandb.mode
    if mode == "disabled":
        return "W&B disabled in the run's config"
    if not _wandb_allowed(cfg):
        return "W&B online but WANDB_API_KEY is not set: pictures not logged"
    import wandb

    run = _wandb_run(cfg, wandb_id, run_dir)
    run.define_metric("step")
    run.define_metric("pictures/*", step_metric="step")
    run.log({"step": step, **{f"pictures/{k}": wandb.Image(str(p)) for k, p in paths.items()}})
    run.finish()
    return f"logged to W&B run {wandb_id} ({mode})"


class MetricsLog:
    """Appends one JSON object per line; every line carries ``step`` and ``epoch``."""

    def __init__(self, run_dir: Path, cfg: RunConfig, wandb_id: str, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.wandb.mode != "disabled":
            if not _wandb_allowed(cfg):
                raise RuntimeError(
                    "wandb.mode=online needs WANDB_API_KEY in the environment "
                    "(or use wandb.mode=offline and `wandb sync` later)"
                )
            self._wandb = _wandb_run(
                cfg, wandb_id, run_dir, config=cfg.to_dict(), tags=cfg.wandb.tags
            )
            self._wandb.define_metric("step")
            self._wandb.define_metric("*", step_metric="step")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if "step" not in record or "epoch" not in record:
            raise ValueError("metrics records need 'step' and 'epoch'")
        record = {k: _clean(v) for k, v in record.items()}
        record.setdefault("time", time.time())
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if not isinstance(v, str)})

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled and self._wandb is not None:
            for k, v in values.items():
                if isinstance(v, int | float | str):
                    self._wandb.summary[k] = v

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class Progress:
    """Rank 0's progress events for the driver's console (:mod:`selfclust.console`): a
    training line every ``log_every`` steps and a line per label update."""

    def __init__(self, total_steps: int, epochs: int, enabled: bool) -> None:
        self.total, self.epochs = total_steps, epochs
        self.enabled = enabled
        self.start(0)

    def start(self, step: int) -> None:
        """Training (re)starts at ``step``: images/s counts from here."""
        self._last_t, self._last_s = time.perf_counter(), step

    def rate(self, step: int, batch: int) -> float:
        """Images/s since the previous call (global batch)."""
        now = time.perf_counter()
        r = (step - self._last_s) * batch / max(1e-9, now - self._last_t)
        self._last_t, self._last_s = now, step
        return r

    def step(self, step: int, epoch: int, loss: float, ips: float) -> None:
        self._emit({"kind": "step", "step": step, "total": self.total, "epoch": epoch,
                    "epochs": self.epochs, "loss": loss, "ips": ips})  # fmt: skip

    def labels(self, record: dict[str, Any], initial: bool) -> None:
        """A label update, from its metrics record (duration, Sinkhorn iterations and
        cluster sizes, where the method has them)."""
        keys = ("step", "epoch", "event", "label_seconds", "sinkhorn_iters",
                "cluster_size_min", "cluster_size_max")  # fmt: skip
        event = {k: _clean(record[k]) for k in keys if k in record}
        if "label_seconds" in event:
            event["seconds"] = event.pop("label_seconds")
        self._emit({"kind": "labels", "epochs": self.epochs, "initial": initial, **event})

    def resumed(self, record: dict[str, Any]) -> None:
        """Training resumes from a checkpoint (a restart, or the command run again)."""
        self._emit({"kind": "resumed", "step": record["step"], "epoch": record["epoch"],
                    "epochs": self.epochs, "workers": record["workers"]})  # fmt: skip

    def _emit(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # A log record, not print(): Ray Train tees print() to the console twice once W&B has
        # wrapped sys.stdout; its root logger shows records once (and files them per worker).
        _log.info(event_line(event))
