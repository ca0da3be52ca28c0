"""Where a :class:`~selfclust.errors.UserError` raised in a Ray worker is told, and where not.

The CLI prints it once, as one line; each rank's traceback is appended to the run dir's
:data:`~selfclust.errors.ERROR_LOG` (:func:`log_user_error`); Ray Train's loggers that would
repeat it with its traceback are quietened (:func:`hide_user_error_logs`). Ray wraps the error
on its way to the driver; :func:`user_error` finds it again. No Ray import: these work on
logger names and exception attributes only (:mod:`selfclust.launch` is the Ray edge).
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from selfclust.errors import ERROR_LOG, UserError

# Ray Train's loggers that repeat a user error with its traceback on the terminal: a
# worker's "Error in training function" and the controller's failure decision. Private
# module names (ray==2.60.*, tests/test_launch_private.py).
RAY_ERROR_LOGGERS = (
    "ray.train.v2._internal.util",
    "ray.train.v2._internal.execution.failure_handling.default",
)


def log_user_error(run_dir: Path, rank: int) -> None:
    """The traceback of this rank's user error (the one being handled), appended to the run
    dir's error log."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(run_dir / ERROR_LOG, "a") as f:
        f.write(f"--- {stamp} rank {rank}\n{traceback.format_exc()}\n")


def user_error(error: BaseException | None) -> UserError | None:
    """The worker's user error that ended a run, if one did. Ray wraps it: in a controller
    failure (``controller_failure``), as the cause of another error, or, raised in a task, in
    a ``RayTaskError`` that is also an instance of its class and keeps it as ``cause``."""
    while error is not None and not isinstance(error, UserError):
        error = getattr(error, "controller_failure", None) or error.__cause__
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, UserError) else error


class UserErrorFilter(logging.Filter):
    """Drops a record about a user error (the CLI prints it once; error.log has it whole):
    one whose exception is a user error, or any, in a worker that is ending on one."""

    def __init__(self, worker: bool) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (self.worker or (error is not None and user_error(error) is not None))


def hide_user_error_logs(worker: bool) -> None:
    """Adds a :class:`UserErrorFilter` to each of :data:`RAY_ERROR_LOGGERS` (once)."""
    for name in RAY_ERROR_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, UserErrorFilter) for f in logger.filters):
            logger.addFilter(UserErrorFilter(worker))
