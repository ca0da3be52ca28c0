"""Ray's private APIs that selfclust uses, checked against the pinned Ray.

The launcher uses ``ray.train.v2._internal.execution.context`` for two things Ray has no
public API for: the name of the logger of the per-report INFO lines, and a worker's own copy
of a preemption notice (read without a barrier); selfclust.ray_console uses the driver's
dispatcher of forwarded worker output and the "ray" logger's handler to send Ray's output to
RUN_DIR/ray.log. These tests fail, naming the pin, when an upgrade moves any of them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest

from selfclust import launch

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def _pin(name: str) -> str:
    """The dependency line of ``name`` in pyproject.toml, e.g. ``ray[default,train]==2.60.*``."""
    m = re.search(rf'"({re.escape(name)}[^"]*)"', PYPROJECT.read_text())
    assert m, f"{name} is not a dependency in {PYPROJECT}"
    return m.group(1)


WHY = (
    f"ray {version('ray')} is installed; selfclust pins {_pin('ray')} (pyproject.toml) because "
    "selfclust.launch uses the private ray.train.v2._internal.execution.context"
)


CONSOLE_WHY = (
    f"ray {version('ray')} is installed; selfclust pins {_pin('ray')} (pyproject.toml) because "
    "selfclust.ray_console uses Ray's private dispatcher of worker output and driver logging"
)


@pytest.fixture(scope="module")
def context():
    ctx = launch.ray_train_context()
    assert ctx is not None, f"ray.train.v2._internal.execution.context does not import: {WHY}"
    return ctx


def test_report_lines_come_from_a_logger_named_after_the_file(context) -> None:
    assert isinstance(context.__file__, str), WHY
    assert context.logger.name == context.__file__, f"the report lines' logger moved: {WHY}"
    logger = logging.getLogger(context.__file__)
    before = logger.level, logging.getLogger("ray.train").level
    try:
        launch._quiet_ray_train_logs()
        assert logger.level == logging.WARNING
        assert logging.getLogger("ray.train").level == logging.WARNING
    finally:
        logger.setLevel(before[0])
        logging.getLogger("ray.train").setLevel(before[1])


def test_preemption_notice_path(context) -> None:
    assert callable(getattr(context, "get_train_context", None)), WHY
    fields = {f.name: f for f in dataclasses.fields(context.TrainContext)}
    assert "preemption_context" in fields, f"TrainContext has no preemption_context: {WHY}"
    notice = fields["preemption_context"].type
    from ray.train.v2._internal.execution.preemption import PreemptionContext

    assert notice in ("PreemptionContext", PreemptionContext), WHY
    assert PreemptionContext().preemption_info is None, WHY


def test_preemption_seen_reads_the_workers_own_notice(context) -> None:
    assert launch._preemption_seen() is None  # outside a training run: unknown
    try:
        for info, seen in ((None, False), (object(), True)):
            fake = SimpleNamespace(preemption_context=SimpleNamespace(preemption_info=info))
            context.set_train_context(fake)
            assert launch._preemption_seen() is seen, WHY
    finally:
        context.set_train_context(None)


def test_report_poll_interval_is_rays_propagated_variable() -> None:
    """launch.POLL_ENV is Ray Train V2's controller poll interval (its default 2 s is what each
    ray.train.report waited), propagated from the driver to the controller and workers."""
    from ray.train.v2._internal import constants

    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == launch.POLL_ENV, WHY
    assert constants.DEFAULT_HEALTH_CHECK_INTERVAL_S == 2.0, WHY
    assert launch.POLL_ENV in constants.ENV_VARS_TO_PROPAGATE, WHY
    assert [launch.report_poll_interval(w) for w in (1, 2, 20, 100, 400, 4096)] == [
        0.1, 0.1, 0.1, 0.5, 2.0, 2.0
    ]  # fmt: skip


def test_the_loggers_that_repeat_a_user_error_exist() -> None:
    """A worker's user error is printed once by the CLI; selfclust.launch filters the records
    of the two Ray Train loggers that would print it again with a traceback."""
    import importlib

    for name in launch.RAY_ERROR_LOGGERS:
        module = importlib.import_module(name)
        assert getattr(module, "logger", None) is not None, f"{name} has no logger: {WHY}"
        assert module.logger.name == name, f"{name}'s logger was renamed: {WHY}"


def test_where_ray_prints_forwarded_output_on_the_driver() -> None:
    """selfclust.ray_console replaces Ray's printer of the workers' output in Ray's dispatcher
    (the handler ray._private.worker.connect registers by name) and files the autoscaler's
    lines as Ray's filter of them leaves them."""
    import inspect

    import ray._private.worker as ray_worker
    from ray._private.ray_logging import WorkerStandardStreamDispatcher

    from selfclust import ray_console

    d = ray_console.dispatcher()
    assert isinstance(d, WorkerStandardStreamDispatcher), CONSOLE_WHY
    assert ray_worker.global_worker_stdstream_dispatcher is d, CONSOLE_WHY
    for method in ("add_handler", "remove_handler", "emit"):
        assert callable(getattr(d, method, None)), f"the dispatcher has no {method}: {CONSOLE_WHY}"
    connect = inspect.getsource(ray_worker.connect)
    assert f'"{ray_console.PRINT_HANDLER}"' in connect, f"Ray's printer was renamed: {CONSOLE_WHY}"
    assert "functools.partial(print_to_stdstream" in connect, CONSOLE_WHY
    assert callable(getattr(ray_worker, "filter_autoscaler_events", None)), CONSOLE_WHY


def test_rays_driver_notices_are_records_of_the_ray_logger() -> None:
    """The token-authentication notice and the cluster's start are records of loggers under
    "ray", whose stderr handler importing Ray installs: ray_console moves that handler."""
    import ray  # noqa: F401
    from ray._private.authentication import authentication_token_setup as auth

    assert auth.logger.name.startswith("ray."), CONSOLE_WHY
    assert callable(getattr(auth, "_warn_token_auth_enabled", None)), CONSOLE_WHY
    handlers = logging.getLogger("ray").handlers
    assert any(type(h).__name__ == "PlainRayHandler" for h in handlers), CONSOLE_WHY


def test_the_gpu_preflight_runs_before_the_process_group() -> None:
    """With trainer.use_gpu, selfclust.launch runs its GPU checks on every worker from a
    subclass of Ray's private _TorchBackend, before on_start creates the process group (whose
    NCCL part fails without CUDA); a GpuError raised there reaches the driver inside a
    ControllerError, as a RayTaskError that keeps it as ``cause``."""
    import inspect

    from ray.exceptions import RayTaskError
    from ray.train import ControllerError
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend
    from ray.train.v2._internal.callbacks.backend_setup import BackendSetupCallback

    from selfclust.error_log import user_error
    from selfclust.train.gpu import GpuError

    assert TorchConfig().backend_cls is _TorchBackend, WHY
    assert callable(getattr(_TorchBackend, "on_start", None)), WHY
    setup = inspect.getsource(BackendSetupCallback)
    assert "backend_config.backend_cls()" in setup and "self._backend.on_start(" in setup, WHY
    config = launch._torch_config(True, {})
    assert issubclass(config.backend_cls, _TorchBackend) and config.backend == "cpu:gloo,cuda:nccl"
    assert launch._torch_config(False, {}).backend_cls is _TorchBackend
    error = GpuError("trainer.use_gpu=true but ...")
    wrapped = RayTaskError("execute", "Traceback ...", error).as_instanceof_cause()
    assert isinstance(wrapped, GpuError) and user_error(ControllerError(wrapped)) is error, WHY
