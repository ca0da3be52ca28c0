"""The loop's own state, each part with ``state_dict`` / ``load_state_dict`` so that a resumed
run logs, picks its best head and reports bad data exactly as an uninterrupted one."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from selfclust.checkpoint import Position


@dataclass
class TrainPosition(Position):
    """:class:`Position` plus the phase: ``pretrain`` (DEC/DEPICT/DGG reconstruction epochs,
    initialisation not yet done) or ``cluster`` (SeLa always)."""

    phase: str = "cluster"

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)


class LossTracker:
    """Losses between metrics lines (a window) and each head's running mean (the best head).

    A logged vector is ``[T]`` per-head losses followed by one entry per named term.
    """

    def __init__(self, heads: int, terms: tuple[str, ...]) -> None:
        self.heads, self.terms = heads, terms
        self.head_loss = torch.zeros(heads)  # EMA of each head's loss (for the best head)
        self._window = torch.zeros(heads + len(terms))  # summed since the last line (host)
        self._pending: torch.Tensor | None = None  # summed since the last read (losses' device)
        self.window_n = 0

    def add(self, losses: torch.Tensor) -> None:
        """Sum ``losses`` where they are: no copy to the host, so a CUDA step never waits for
        its last kernel here; the sum reaches the host when :attr:`window_loss` is read."""
        if self._pending is None:
            self._pending = losses.detach().clone()
        else:
            self._pending += losses
        self.window_n += 1

    @property
    def window_loss(self) -> torch.Tensor:
        """The window's summed vector on the host (read at log steps and checkpoints)."""
        if self._pending is not None:
            self._window += self._pending.cpu()
            self._pending = None
        return self._window

    def flush(self) -> torch.Tensor:
        """The window's mean vector (this rank); the window restarts."""
        mean = self.window_loss / self.window_n
        self._window.zero_()
        self.window_n = 0
        return mean

    def update_heads(self, mean_losses: torch.Tensor) -> None:
        """Fold one window's mean per-head loss (all ranks) into the running mean."""
        self.head_loss = (
            0.9 * self.head_loss + 0.1 * mean_losses
            if self.head_loss.any()
            else (mean_losses.clone())
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "head_loss": self.head_loss.clone(),
            "window_loss": self.window_loss.clone(),
            "window_n": self.window_n,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head_loss = state["head_loss"].clone()
        self._window, self._pending = state["window_loss"].clone(), None
        self.window_n = int(state["window_n"])


class DataHealth:
    """Bad data met in training over the whole run, all ranks: corrupt images, samples of
    unreadable shards, unreadable shards (each encounter counted)."""

    def __init__(self) -> None:
        self.counts = torch.zeros(3, dtype=torch.int64)

    @staticmethod
    def epoch_counts(batches: Any) -> torch.Tensor:
        """This rank's bad-data counts in the epoch so far (summed over loader workers)."""
        st = batches.stats
        return torch.tensor([st.corrupt_images, st.missing_samples, len(st.bad_shards)])

    def summary(self) -> dict[str, int]:
        return {
            "data_corrupt_images": int(self.counts[0]),
            "data_missing_samples": int(self.counts[1]),
            "data_bad_shards": int(self.counts[2]),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"data_bad": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = state.get("data_bad", self.counts).clone()


def resumed_record(pos: TrainPosition, saved_world: int, world: int) -> dict[str, Any]:
    """The metrics line of a resumed attempt. Steps after its checkpoint may already be in
    metrics.jsonl from the lost attempt; this line marks where the resumed records start."""
    record: dict[str, Any] = {
        "step": pos.global_step,
        "epoch": pos.epoch,
        "event": "resumed",
        "step_in_epoch": pos.step_in_epoch,
    }
    if saved_world != world:
        # Elastic resume: the global batch, steps per epoch, LR and relabel schedules do not
        # depend on the worker count, so the position carries over unchanged. Only the rest
        # of this epoch is drawn from the new split (some of its samples may be seen twice,
        # others not at all); later epochs are as in a fresh run of this size.
        record.update(event="resumed_elastic", from_workers=saved_world)
    record["workers"] = world
    return record
