"""Schedules as pure functions of the step: learning rate and relabel times."""

from __future__ import annotations

import bisect
import math

from selfclust.config import OptimConfig


def relabel_steps(total_steps: int, relabels: int, power: float = 2.0, start: int = 0) -> list[int]:
    """Steps (in ``start..total_steps-1``) at which pseudo-labels are recomputed.

    SeLa spaces its label updates quadratically over training: t_j = T (j / R)^2, so updates
    come often early, when the representation changes fast, and rarely late. Step 0 holds the
    initial labels (k-means or random), so the first update here is t_1 > 0. ``start`` delays
    the schedule, letting the network first fit its initial labels.
    """
    if total_steps < 1 or relabels < 1:
        return []
    span = total_steps - start
    steps = {start + int(span * (j / relabels) ** power) for j in range(1, relabels)}
    if start > 0:
        steps.add(start)
    return sorted(s for s in steps if 0 < s < total_steps)


class RelabelSchedule:
    """The label updates of a run: ``relabels`` over the ``steps`` of the clustering phase,
    which starts at global step ``first_step``; the last ``manifold`` of them by UMAP + GMM."""

    def __init__(
        self, first_step: int, steps: int, relabels: int, power: float, start: float, manifold: int
    ) -> None:
        schedule = relabel_steps(steps, relabels, power, int(start * steps))
        self.steps = sorted({first_step + s for s in schedule})
        self.manifold = manifold

    def due(self, step: int, labels_step: int) -> bool:
        """A scheduled update at ``step`` that is not already in the bank."""
        return step in self.steps and labels_step != step

    def manifold_at(self, step: int) -> bool:
        """Whether the update at ``step`` is one of the last ``manifold``."""
        later = len(self.steps) - bisect.bisect_left(self.steps, step)
        return later <= self.manifold


# The step schedule divides the learning rate by 10 at each milestone (SeLa's, and every
# shipped step recipe's).
STEP_GAMMA = 0.1


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for ``step`` (0-based): linear warm-up, then step / cosine / constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = step / max(1, total_steps)
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "step":
        drops = sum(1 for m in cfg.milestones if frac >= m)
        return cfg.lr * STEP_GAMMA**drops
    return cfg.lr
