"""Where Ray's output goes on the driver of ``selfclust train``: ``RUN_DIR/ray.log``, and on
the terminal only selfclust's own progress (:mod:`selfclust.console`).

Ray forwards every line its processes print (the Ray Train controller and workers, the
raylet, their C++ error lines) to the driver, where a handler of
``ray._private.ray_logging.global_worker_stdstream_dispatcher`` prints it. :class:`RayOutput`
puts :meth:`RayOutput.handle` in that handler's place: each line is appended to ``ray.log``
(with Ray's ``(RayTrainWorker pid=…)`` prefix, without colour) and only rank 0's progress
events reach the terminal. The driver's own ``ray`` logger (Ray's INFO and WARNING lines:
the cluster start, the token-authentication notice) writes to ``ray.log`` too, for a local
cluster that selfclust starts; on a cluster the user started (``ray.address``), Ray's logging
is left as it is. ``--verbose``: everything reaches the terminal as Ray prints it, and is
also in ``ray.log``.

What stays on the terminal: errors the driver raises (a worker's user error as one line, an
unexpected exception with its traceback) and the raylet's messages about a process that died
(Ray prints those itself, outside the handler above).

Private Ray APIs used here (ray==2.60.*, checked by tests/test_launch_private.py): the
dispatcher, the name of Ray's handler in it (:data:`PRINT_HANDLER`), and Ray's filter of the
autoscaler's lines.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from selfclust.console import Console, parse_event
from selfclust.errors import UserError

RAY_LOG = "ray.log"  # in the run dir
# The name under which ray._private.worker.connect registers its printer of worker output
# (functools.partial(print_to_stdstream, ignore_prefix=...)) with the dispatcher.
PRINT_HANDLER = "ray_print_logs"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_log = logging.getLogger("selfclust")


def dispatcher() -> Any:
    """Ray's dispatcher of worker output on the driver (private)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    return global_worker_stdstream_dispatcher


def source(batch: dict[str, Any]) -> str:
    """Ray's prefix of a batch's lines: ``(RayTrainWorker pid=6179)``, ``(raylet)``, with
    ``, ip=…`` for another node."""
    pid = batch.get("pid")
    if pid in ("autoscaler", "raylet"):
        return f"({pid})"
    name = batch.get("actor_name") or batch.get("task_name")
    ip = batch.get("ip")
    where = "" if ip is None or ip == batch.get("localhost") else f", ip={ip}"
    return f"({name + ' ' if name else ''}pid={pid}{where})"


def route(batch: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]], list[str]]:
    """A batch of Ray's forwarded output (``{"lines", "pid", "ip", "is_err", "actor_name",
    …}``) → (the lines for ray.log, prefixed and without colour; selfclust's progress events;
    the other lines, which ``--verbose`` prints as Ray does)."""
    prefix, lines = source(batch), list(batch.get("lines", []))
    events = [e for e in map(parse_event, lines) if e is not None]
    others = [line for line in lines if parse_event(line) is None]
    if batch.get("pid") == "autoscaler":  # the monitor's whole log: its events, as Ray prints
        from ray._private.worker import filter_autoscaler_events

        try:
            lines = list(filter_autoscaler_events(lines))
        except Exception:  # it asks the GCS which autoscaler runs; without one, keep all
            pass
    logged = [f"{prefix} {_ANSI.sub('', line)}" for line in lines]
    return logged, events, others


class _RayLogFile(logging.FileHandler):
    """The driver's Ray log records, appended to ray.log."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s -- %(message)s"))


class RayOutput:
    """Ray's output of one ``selfclust train`` on this driver: ``ray.log`` and the console.

    Use as a context manager around ``ray.init`` and the training: entering calls
    :meth:`driver_logs` (a local cluster's start and the token notice are logged there),
    leaving :meth:`close`, and after an unexpected error says where Ray's side of it is. Call
    :meth:`worker_output` after ``ray.init``.
    """

    def __init__(
        self, run_dir: Path, verbose: bool, local: bool, console: Console | None = None
    ) -> None:
        """``local``: selfclust starts the cluster; ``console``: default, on stderr (with
        --verbose a line per event, among Ray's)."""
        self.path = run_dir / RAY_LOG
        self.verbose, self.local = verbose, local
        self.console = console or Console(mode="all" if verbose else None)
        self._file: IO[str] = self.path.open("a", buffering=1)  # line-buffered
        self._lock = threading.Lock()  # Ray's log thread shows, the main thread closes
        self._ray_print: Callable[[dict[str, Any]], None] | None = None

    def driver_logs(self) -> None:
        """The driver's ``ray`` logger writes to ray.log; for a local cluster and without
        --verbose, no longer to the terminal."""
        import ray  # (importing ray gives the "ray" logger its stderr handler)

        if not self.local or ray.is_initialized():  # a cluster selfclust did not start
            return
        ray_logger = logging.getLogger("ray")
        for h in list(ray_logger.handlers):
            terminal = isinstance(h, logging.StreamHandler) and not isinstance(
                h, logging.FileHandler
            )
            if isinstance(h, _RayLogFile) or (terminal and not self.verbose):
                ray_logger.removeHandler(h)  # (a _RayLogFile: an earlier run's, in-process)
        ray_logger.addHandler(_RayLogFile(self.path))

    def worker_output(self) -> None:
        """Ray's printer of forwarded output is replaced by :meth:`handle` (and kept, for
        --verbose); Ray removes the handler by name when the driver disconnects."""
        d = dispatcher()
        rays = [h for name, h in list(d.handlers) if name == PRINT_HANDLER]
        d.remove_handler(PRINT_HANDLER)
        for h in rays:  # an earlier run's handle, in-process: Ray's printer is behind it
            earlier = getattr(h, "__self__", None)
            self._ray_print = earlier._ray_print if isinstance(earlier, RayOutput) else h
        d.add_handler(PRINT_HANDLER, self.handle)
        if not self.verbose:
            self.console.write(f"[selfclust] Ray's output: {self.path} (--verbose shows it here)")

    def handle(self, batch: dict[str, Any]) -> None:
        """One batch of forwarded output (called on Ray's log thread)."""
        logged, events, others = route(batch)
        self._file.writelines(line + "\n" for line in logged)
        with self._lock:
            for event in events:
                try:
                    self.console.show(event)
                except (KeyError, TypeError, ValueError) as e:  # an event of another version
                    self._file.write(f"selfclust: cannot show {event}: {e!r}\n")
        if self.verbose and others and self._ray_print is not None:
            self._ray_print({**batch, "lines": others})

    def close(self) -> None:
        """The bar ends; lines that still come in go to ray.log only."""
        with self._lock:
            self.console.close()

    def __enter__(self) -> RayOutput:
        self.driver_logs()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: Any, tb: Any) -> None:
        self.close()
        if kind is not None and issubclass(kind, Exception) and not self.verbose:
            if not issubclass(kind, UserError):  # a bug or a fault: Ray's side of it is here
                print(f"[selfclust] Ray's output, with each worker's traceback: {self.path}",
                      file=sys.stderr)  # fmt: skip
