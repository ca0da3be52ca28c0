"""Just-in-time checkpoints on a spot/preemptible node's reclaim notice.

When Ray drains a node with reason PREEMPTION, every rank of the worker group sees a notice;
the loop then checkpoints once and keeps training. When the node goes, Ray Train restarts
the group from that checkpoint, so a reclaim with notice costs the restart, not the steps
since the last checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from selfclust import collectives as C
from selfclust.train.context import WorkerContext

# Each poll is a barrier over the ranks (one all-reduce); every 10 steps is well inside the
# 30-120 s a spot notice gives, and costs nothing measurable per step.
CHECK_EVERY = 10


class PreemptionWatcher:
    """Polls for a notice every ``every`` steps (0: never); reports each run's first one."""

    def __init__(self, ctx: WorkerContext, every: int = CHECK_EVERY) -> None:
        self.ctx, self.every = ctx, every
        self.saved = False  # one just-in-time checkpoint per notice

    def notice(self, step: int) -> dict[str, Any] | None:
        """Collective: Ray's notice (``deadline_ms``, ``ranks``) the first time one is seen."""
        if not self.every or step % self.every or self.saved:
            return None
        seen = self.ctx.preemption_seen()
        flag = torch.tensor([1.0 if seen is None or seen else 0.0])
        if not C.all_reduce_max(flag).item():  # µs over gloo; Ray's barrier only on a notice
            return None
        info = self.ctx.preemption()
        if info is None:
            return None
        self.saved = True
        return info
