"""ruff and mypy run as part of the test suite, so CI enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_clean() -> None:
    r = _run("ruff", "check", "selfclust", "tests", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run("ruff", "format", "--check", "selfclust", "tests", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_clean() -> None:
    r = _run("mypy", "selfclust")
    assert r.returncode == 0, r.stdout + r.stderr
