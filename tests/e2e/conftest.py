"""The end-to-end tests' shared runs: digits shards and one uninterrupted reference run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfclust.shards.write import write_shards
from tests.helpers.cli_runs import STEPS, finish, start, train_cmd


@pytest.fixture(scope="session")
def digits_shards(digits_npz: Path, tmp_path_factory) -> Path:
    """sklearn digits (1797 real 8×8 images) in 5 WebDataset shards."""
    out = tmp_path_factory.mktemp("data") / "digits"
    write_shards(digits_npz, out, shard_size=400)
    return out


@pytest.fixture(scope="session")
def reference_run(digits_shards: Path, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted `selfclust train` on 2 Ray workers (cli_runs.FAULT_RUN): its run dir and
    its summary as first written. The end-to-end CLI test inspects it; the fault tests compare
    their interrupted runs' model digests with it."""
    run = tmp_path_factory.mktemp("reference") / "run"
    log = run.parent / "log.txt"
    finish(start(train_cmd(digits_shards, run), log), log)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS
    # keep_last=2: Ray prunes older checkpoints (the last deletion may still be in flight)
    assert len(list(run.glob("ray/*/checkpoint_*"))) <= 3
    return run, summary
