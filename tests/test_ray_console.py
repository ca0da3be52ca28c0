"""selfclust.ray_console: which of Ray's lines go to RUN_DIR/ray.log and which to the terminal,
with lines as Ray 2.60 forwards them from a real `selfclust train` (the batches its log
monitor publishes, and the driver's own Ray log records), through Ray's real dispatcher."""

from __future__ import annotations

import functools
import io
import logging
from pathlib import Path

import pytest

from selfclust.console import Console, event_line
from selfclust.ray_console import PRINT_HANDLER, RayOutput, dispatcher, route

STEP = {"kind": "step", "step": 5, "total": 56, "epoch": 0, "epochs": 2, "loss": 2.3191,
        "ips": 1813.1}  # fmt: skip
LABELS = {"kind": "labels", "epochs": 2, "initial": False, "step": 6, "epoch": 0,
          "event": "relabel", "sinkhorn_iters": 3, "cluster_size_min": 54,
          "cluster_size_max": 471, "seconds": 0.89}  # fmt: skip
CORE_WORKER = (
    "[2026-12-03 06:51:11,195 E 6062 6091] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: '87811e7547330859e850b2cb01000000' has constructor arguments "
    "in the object store and max_restarts > 0. If the arguments in the object store go out of "
    "scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details."
)
CONTROLLER = {"ip": "192.0.2.2", "localhost": "192.0.2.2", "pid": 6062, "job": "01000000",
              "is_err": True, "actor_name": "TrainController", "task_name": None,
              "lines": ["Requesting resources: {'CPU': 1} * 2", CORE_WORKER]}  # fmt: skip
WORKER = {"ip": "192.0.2.2", "localhost": "192.0.2.2", "pid": 6179, "job": "01000000",
          "is_err": True, "actor_name": "RayTrainWorker", "task_name": None,
          "lines": ["Setting up process group for: env:// [rank=0, world_size=2]",
                    event_line(STEP), event_line(LABELS)]}  # fmt: skip
OTHER_NODE = {**WORKER, "ip": "192.0.2.7", "pid": 311, "lines": ["Error in training function:"]}
AUTOSCALER = {"ip": "192.0.2.2", "localhost": "192.0.2.2", "pid": "autoscaler",
              "is_err": False, "lines": [
                  "2026-12-03 07:04:23,075\tINFO autoscaler.py:408 -- ",
                  "======== Autoscaler status: 2026-12-03 07:04:23.075492 ========"]}  # fmt: skip


def test_route_logs_every_line_and_picks_out_selfclusts_events() -> None:
    logged, events, others = route(CONTROLLER)
    assert logged == [f"(TrainController pid=6062) {x}" for x in CONTROLLER["lines"]]
    assert events == [] and others == CONTROLLER["lines"]

    logged, events, others = route(WORKER)
    assert logged == [f"(RayTrainWorker pid=6179) {x}" for x in WORKER["lines"]]
    assert events == [STEP, LABELS]
    assert others == WORKER["lines"][:1]  # what --verbose prints as Ray does

    other_node = "(RayTrainWorker pid=311, ip=192.0.2.7) Error in training function:"
    assert route(OTHER_NODE)[0] == [other_node]
    logged, events, others = route(AUTOSCALER)
    assert not events and others == AUTOSCALER["lines"]
    assert all(x.startswith("(autoscaler) ") for x in logged)


def test_route_drops_colour() -> None:
    batch = {**WORKER, "lines": ["\x1b[1m\x1b[32mhttp://127.0.0.1:50893 \x1b[39m\x1b[22m"]}
    assert route(batch)[0] == ["(RayTrainWorker pid=6179) http://127.0.0.1:50893 "]


@pytest.fixture
def ray_logger():
    """The driver's "ray" logger as importing Ray leaves it, restored afterwards; its handler
    writes to ``logger.terminal`` (it holds the sys.stderr of the time Ray was imported)."""
    import ray  # noqa: F401

    logger = logging.getLogger("ray")
    handlers = list(logger.handlers)
    logger.terminal = io.StringIO()  # type: ignore[attr-defined]
    streams = [(h, h.setStream(logger.terminal)) for h in handlers
               if type(h).__name__ == "PlainRayHandler"]  # fmt: skip
    assert streams, "importing ray gives the 'ray' logger a PlainRayHandler"
    yield logger
    for h in logger.handlers:
        if h not in handlers:
            h.close()
    logger.handlers[:] = handlers
    for h, stream in streams:
        h.setStream(stream)


@pytest.fixture
def rays_printer():
    """Ray's printer of worker output in the dispatcher, as ray.init registers it."""
    from ray._private.worker import print_to_stdstream

    d = dispatcher()
    before = list(d.handlers)
    d.add_handler(PRINT_HANDLER, functools.partial(print_to_stdstream, ignore_prefix=False))
    yield d
    d.handlers[:] = before


def _token_notice() -> None:
    """Ray's own notice, as ray.init logs it for a new local cluster (RAY_AUTH_MODE unset)."""
    from ray._private.authentication import authentication_token_setup

    authentication_token_setup._warn_token_auth_enabled()


def test_default_rays_lines_to_the_log_progress_to_the_terminal(
    tmp_path: Path, ray_logger, rays_printer, capfd
) -> None:
    shown = io.StringIO()
    with RayOutput(tmp_path, verbose=False, local=True, console=Console(shown)) as output:
        _token_notice()
        logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
        output.worker_output()
        for batch in (CONTROLLER, WORKER, OTHER_NODE, AUTOSCALER):
            rays_printer.emit(batch)
    out, err = capfd.readouterr()
    assert out == "" and err == "" and ray_logger.terminal.getvalue() == ""  # nothing of Ray's
    log = (tmp_path / "ray.log").read_text()
    assert "WARNING ray._private.authentication" in log and "Token authentication is enabled" in log
    assert "INFO ray._private.worker -- Started a local Ray instance." in log
    assert f"(TrainController pid=6062) {CORE_WORKER}" in log
    assert "(RayTrainWorker pid=6179) Setting up process group" in log
    assert "(RayTrainWorker pid=311, ip=192.0.2.7) Error in training function:" in log
    lines = shown.getvalue().splitlines()
    assert lines[0] == f"[selfclust] Ray's output: {tmp_path / 'ray.log'} (--verbose shows it here)"
    assert lines[1].startswith("[selfclust] step 5/56 epoch 1/2 loss 2.3191 1,813 img/s")
    assert lines[2] == (
        "[selfclust] labels at step 6 (epoch 1/2): 0.9 s, Sinkhorn 3 iterations, "
        "clusters of 54-471 samples"
    )
    assert len(lines) == 3
    assert rays_printer.handlers[-1] == (PRINT_HANDLER, output.handle)


def test_verbose_everything_on_the_terminal_as_ray_prints_it_and_in_the_log(
    tmp_path: Path, ray_logger, rays_printer, capfd
) -> None:
    shown = io.StringIO()
    with RayOutput(tmp_path, verbose=True, local=True, console=Console(shown, "all")) as output:
        _token_notice()
        output.worker_output()
        for batch in (CONTROLLER, WORKER):
            rays_printer.emit(batch)
    out, err = capfd.readouterr()
    assert "Token authentication is enabled" in ray_logger.terminal.getvalue()  # Ray's handler
    assert "(TrainController pid=6062)" in err and "core_worker.cc:2465" in err
    assert "Setting up process group" in err
    assert "selfclust:progress" not in out + err  # the events are the console's
    assert shown.getvalue().splitlines()[1].startswith("[selfclust] labels at step 6")
    log = (tmp_path / "ray.log").read_text()
    assert "Token authentication is enabled" in log and "core_worker.cc:2465" in log


def test_on_the_users_cluster_rays_driver_logging_is_left_alone(
    tmp_path: Path, ray_logger, rays_printer, capfd
) -> None:
    handlers = list(ray_logger.handlers)
    with RayOutput(tmp_path, verbose=False, local=False, console=Console(io.StringIO())) as out:
        assert ray_logger.handlers == handlers
        _token_notice()
        out.worker_output()
        rays_printer.emit(CONTROLLER)
    err = capfd.readouterr().err
    assert "Token authentication is enabled" in ray_logger.terminal.getvalue()  # Ray's, as set
    assert "core_worker.cc" not in err  # worker lines: ray.log without --verbose
    assert "core_worker.cc:2465" in (tmp_path / "ray.log").read_text()


def test_a_bug_points_at_the_log_a_user_error_does_not(tmp_path: Path, ray_logger, capfd) -> None:
    from selfclust.errors import DataError

    with pytest.raises(DataError), RayOutput(tmp_path, False, True, Console(io.StringIO())):
        raise DataError("no samples")
    assert capfd.readouterr().err == ""
    with pytest.raises(RuntimeError), RayOutput(tmp_path, False, True, Console(io.StringIO())):
        raise RuntimeError("a bug")
    assert capfd.readouterr().err == (
        f"[selfclust] Ray's output, with each worker's traceback: {tmp_path / 'ray.log'}\n"
    )
