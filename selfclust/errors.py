"""Errors that are the user's to fix, told apart from faults and bugs.

A :class:`UserError` will repeat on every attempt: a config key, missing or corrupt data, a
run dir of another run, a loss that diverges at these settings. The command line prints it as
one line (what is wrong, which file or key, what to do) and exits with code 2. Raised inside a
Ray worker, it ends the run at once instead of spending Ray Train's restarts, which are for
faults a restart can cure (a lost worker or node, a preemption); its traceback goes to the run
dir's :data:`ERROR_LOG`. Any other exception is a bug and keeps its full traceback.

Each error class of selfclust that a user causes derives from :class:`UserError` and from the
builtin it always was (``ValueError``, ``FileNotFoundError``, ...), so callers that catch the
builtin keep working.
"""

from __future__ import annotations

ERROR_LOG = "error.log"  # in the run dir: the traceback of each rank's user error


class UserError(Exception):
    """An error in what the user gave (config, data, run dir): retrying cannot cure it."""


class DataError(UserError, ValueError):
    """The data cannot be trained on as configured (too few samples, unreadable shards...)."""


class ShardsChanged(UserError, RuntimeError):
    """The shards do not hold what their manifest says (rewritten, mixed or cut off)."""
