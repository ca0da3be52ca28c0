"""The terminal of ``selfclust train``: rank 0's progress events, shown on the driver.

Rank 0 writes each event as one line, :data:`MARKER` followed by a JSON object (a log record
of the ``selfclust`` logger, which Ray forwards from the worker to the driver with its own
output); :class:`selfclust.ray_console.RayOutput` picks these lines out of Ray's and hands
them to :class:`Console`, which draws a tqdm bar on a terminal and, elsewhere (CI, a file),
writes a plain line now and then instead of a stream of carriage returns. The events:

- ``{"kind": "step", "step", "total", "epoch", "epochs", "loss", "ips"}``: a training line
  (every ``trainer.log_every`` steps; ``epoch`` counts from 0, ``ips`` is images/s);
- ``{"kind": "labels", "step", "epoch", "epochs", "initial", "event", "seconds", ...}``: a
  label update, with ``sinkhorn_iters`` where Sinkhorn ran and the cluster-size range
  (``cluster_size_min``, ``cluster_size_max``);
- ``{"kind": "resumed", "step", "epoch", "epochs", "workers"}``: training resumed from a
  checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import IO, Any, Literal

from tqdm import tqdm

MARKER = "[selfclust:progress] "
# Off a terminal: a plain line at each tenth of the run and at least every LINE_EVERY_S.
LINE_EVERY_S = 60.0
LINE_FRACTION = 0.1

Mode = Literal["bar", "lines", "all"]


def event_line(event: dict[str, Any]) -> str:
    """The line rank 0 writes for ``event``."""
    return MARKER + json.dumps(event)


def parse_event(line: str) -> dict[str, Any] | None:
    """The event in a line of worker output (anything before the marker is Ray's prefix),
    or None if the line holds none."""
    at = line.find(MARKER)
    if at < 0:
        return None
    try:
        event = json.loads(line[at + len(MARKER) :])
    except json.JSONDecodeError:  # cut off, or not ours after all
        return None
    return event if isinstance(event, dict) and "kind" in event else None


def labels_text(e: dict[str, Any]) -> str:
    """A label update in one line, e.g. ``labels at step 52 (epoch 2/8): 3.1 s, Sinkhorn 12
    iterations, clusters of 54-471 samples``."""
    where = f"step {e['step']} (epoch {e['epoch'] + 1}/{e['epochs']})"
    name = "first labels" if e.get("initial") else "labels"
    event = e.get("event", "")
    how = f" ({event.removeprefix('init_')})" if event not in ("", "relabel") else ""
    parts = [f"{e['seconds']:.1f} s"] if "seconds" in e else []
    if "sinkhorn_iters" in e:
        parts.append(f"Sinkhorn {e['sinkhorn_iters']} iterations")
    if "cluster_size_min" in e:
        parts.append(f"clusters of {e['cluster_size_min']}-{e['cluster_size_max']} samples")
    return f"[selfclust] {name}{how} at {where}: " + ", ".join(parts)


def step_text(e: dict[str, Any], eta_s: float) -> str:
    eta = tqdm.format_interval(eta_s) if math.isfinite(eta_s) else "?"
    return (
        f"[selfclust] step {e['step']}/{e['total']} epoch {e['epoch'] + 1}/{e['epochs']} "
        f"loss {e['loss']:.4f} {e['ips']:,.0f} img/s ETA {eta}"
    )


def _terminal_columns(stream: IO[str]) -> int:
    """The width of the terminal ``stream`` writes to; 0 if it is none (a pipe, a file) or
    reports no size (some pseudo-terminals, where a bar would not show)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (AttributeError, OSError, ValueError):  # no fileno (a StringIO), or a closed one
        return 0


class Console:
    """Shows progress events on ``stream`` (default: stderr).

    ``mode``: ``bar`` a tqdm bar (step, epoch, loss, images/s, ETA); ``lines`` a plain line at
    each tenth of the run or every :data:`LINE_EVERY_S`; ``all`` a plain line per event (with
    ``--verbose``, among Ray's lines). ``None`` picks ``bar`` on a terminal (one that reports
    a width), else ``lines``. Label updates are a line each in every mode. Events come from
    one thread (Ray's log thread); :class:`selfclust.ray_console.RayOutput` locks around
    :meth:`close`.
    """

    def __init__(self, stream: IO[str] | None = None, mode: Mode | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.mode: Mode = mode or ("bar" if _terminal_columns(self.stream) else "lines")
        self._bar: tqdm | None = None
        self._start: tuple[float, int] | None = None  # (time, step) of the first event
        self._last_line = (-math.inf, -1)  # (time, step) of the last plain line
        self._seen = -1  # the last step shown
        self.closed = False

    def show(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        if event.get("kind") == "step":
            self._step(event)
        elif event.get("kind") == "labels":
            self.write(labels_text(event))
        elif event.get("kind") == "resumed":
            self._restart()
            self.write(
                f"[selfclust] resumed from the checkpoint at step {event['step']} (epoch "
                f"{event['epoch'] + 1}/{event['epochs']}) on {event['workers']} workers"
            )

    def write(self, text: str) -> None:
        """A line of text (above the bar, if one is drawn)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _step(self, e: dict[str, Any]) -> None:
        now, step, total = time.monotonic(), int(e["step"]), int(e["total"])
        if self._start is not None and step <= self._seen:  # a restart, from a checkpoint
            self._restart()
        if self._start is None:
            self._start = (now, step)
        self._seen = step
        if self.mode == "bar":
            self._draw(e, step, total)
            return
        t0, s0 = self._start
        eta = (now - t0) / (step - s0) * (total - step) if step > s0 else math.nan
        tenth = max(1, int(total * LINE_FRACTION))
        new_tenth = step // tenth > self._last_line[1] // tenth
        if self.mode == "all" or new_tenth or now - self._last_line[0] >= LINE_EVERY_S:
            self._last_line = (now, step)
            self.write(step_text(e, eta))

    def _restart(self) -> None:
        """Training goes on from an earlier step: rates, ETA and the bar start again."""
        self._start, self._last_line = None, (-math.inf, -1)
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _draw(self, e: dict[str, Any], step: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=total,
                initial=step,
                file=self.stream,
                unit="step",
                dynamic_ncols=True,
                bar_format="{desc} {percentage:3.0f}%|{bar}| step {n_fmt}/{total_fmt} "
                "[{elapsed}<{remaining}{postfix}]",
            )
        self._bar.set_description_str(f"epoch {e['epoch'] + 1}/{e['epochs']}", refresh=False)
        self._bar.set_postfix_str(f"loss {e['loss']:.4f}, {e['ips']:,.0f} img/s", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """End the bar (before the results table); later events are dropped."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.closed = True
