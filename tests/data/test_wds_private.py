"""webdataset's private shuffle buffer, behind selfclust.data.worker_streams.wds_shuffle.

``wds.filters._shuffle`` is not public API. The training data order (and so every resumed
run) depends on it drawing exactly as it does in the pinned version; these tests fail, naming
the pin, when an upgrade removes it or changes its stream.
"""

from __future__ import annotations

import inspect
import random
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import webdataset as wds

from selfclust.data.worker_streams import wds_shuffle

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"


def _pin(name: str) -> str:
    """The dependency line of ``name`` in pyproject.toml, e.g. ``webdataset==1.0.*``."""
    m = re.search(rf'"({re.escape(name)}[^"]*)"', PYPROJECT.read_text())
    assert m, f"{name} is not a dependency in {PYPROJECT}"
    return m.group(1)


PIN = _pin("webdataset")
WHY = (
    f"webdataset {version('webdataset')} is installed; selfclust pins {PIN} (pyproject.toml) "
    "because selfclust.data.worker_streams.wds_shuffle calls the private wds.filters._shuffle"
)


def test_private_shuffle_is_there() -> None:
    shuffle = getattr(wds.filters, "_shuffle", None)
    assert callable(shuffle), f"wds.filters._shuffle is gone: {WHY}"
    params = list(inspect.signature(shuffle).parameters)
    assert params[:4] == ["data", "bufsize", "initial", "rng"], f"{params}: {WHY}"


@pytest.mark.parametrize(
    "n,size,seed,expected",
    [
        (20, 5, 0, [3, 4, 0, 2, 8, 5, 9, 7, 10, 11, 14, 1, 16, 15, 13, 17, 6, 18, 19, 12]),
        (12, 100, 3, [3, 9, 8, 2, 5, 4, 11, 6, 0, 10, 7, 1]),  # buffer larger than the stream
    ],
)
def test_shuffle_stream_is_unchanged(n, size, seed, expected) -> None:
    got = list(wds_shuffle(iter(range(n)), size, random.Random(seed)))
    assert got == expected, f"the shuffle buffer draws differently: {WHY}"


def test_wrapper_names_the_pin_when_the_private_api_is_gone(monkeypatch) -> None:
    monkeypatch.delattr(wds.filters, "_shuffle")
    with pytest.raises(ImportError, match=re.escape(PIN)):
        wds_shuffle(iter(range(3)), 2, random.Random(0))
