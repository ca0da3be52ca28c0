"""Test data with nothing outside the repository required.

* sklearn digits (1797 real 8×8 images, values 0..16) always come from
  ``sklearn.datasets.load_digits``, in the npz format of the shared copy (``x`` uint8
  [1797, 8, 8], ``y`` int64 [1797]); ``tests/helpers/test_digits.py`` checks that the two are
  byte-identical where the shared copy is present.
* The built-in MNIST test set ships in ``selfclust/datasets/mnist_test``.
* The larger sets (CIFAR-10, USPS, COIL-20, ORL) live in one data root: ``$SELFCLUST_DATA`` if
  set (a path that does not exist means none), else ``../shared/data`` beside the repository
  if it exists, else none. Tests that need them skip, naming the missing path.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[2]  # the repository
MNIST = ROOT / "selfclust" / "datasets" / "mnist_test"
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def data_root() -> Path | None:
    """``$SELFCLUST_DATA``, else ``../shared/data`` beside the repository; None if missing."""
    env = os.environ.get("SELFCLUST_DATA")
    path = Path(env) if env else DEFAULT_DATA
    return path if path.is_dir() else None


DATA = data_root()


def shared_data(rel: str) -> Path:
    """``DATA / rel``, or skip the test with a reason naming the missing path."""
    env = os.environ.get("SELFCLUST_DATA")
    where = f"SELFCLUST_DATA={env}" if env else f"SELFCLUST_DATA unset, default {DEFAULT_DATA}"
    if DATA is None:
        pytest.skip(f"no data root for {rel} ({where} does not exist)")
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"{path} not found ({where})")
    return path


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.uint8)  # [1797, 8, 8]; float64 holding the integers 0..16
    y = d.target.astype(np.int64)  # [1797]
    assert np.array_equal(x, d.images) and x.shape == (1797, 8, 8)
    return x, y


def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits: ``x`` uint8 [1797, 8, 8] (0..16), ``y`` int64 [1797]; fresh copies."""
    x, y = _digits()
    return x.copy(), y.copy()


def write_digits_npz(path: Path) -> Path:
    """The digits as an npz file like the shared ``sklearn_digits.npz`` (same arrays; with the
    same numpy and zlib, the same bytes)."""
    x, y = digits()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=x, y=y)
    return path
