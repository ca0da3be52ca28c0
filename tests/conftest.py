"""Shared fixtures. Test data: tests/helpers/data.py (sklearn digits generated, never read
from outside the repository; larger sets from SELFCLUST_DATA or ../shared/data, else skipped)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.data import write_digits_npz

TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n 2``, ``--dist loadgroup`` from pyproject.toml) each test file
    runs on one worker, so its module fixtures are built once, and all of tests/e2e on one,
    since its files share the reference run (tests/e2e/conftest.py). Ignored without -n."""
    for item in items:
        rel = Path(item.path).relative_to(TESTS)
        group = "e2e" if rel.parts[0] == "e2e" else rel.as_posix()
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small tensors, many ops: OpenMP on a busy 2-core CI box is 10-50x slower than 1 thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> Path:
    """sklearn digits as ``sklearn_digits.npz`` (``x`` uint8 [1797, 8, 8], ``y`` int64)."""
    return write_digits_npz(tmp_path_factory.mktemp("sklearn_digits") / "sklearn_digits.npz")
