"""The generated sklearn digits are the shared copy's, array for array and byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers.data import digits, shared_data

# From the shared copy's README: images per class 0..9.
COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_npz_format(digits_npz: Path) -> None:
    with np.load(digits_npz) as d:
        assert sorted(d.files) == ["x", "y"]
        x, y = d["x"], d["y"]
    assert x.dtype == np.uint8 and x.shape == (1797, 8, 8) and x.flags.c_contiguous
    assert y.dtype == np.int64 and y.shape == (1797,)
    assert x.min() == 0 and x.max() == 16
    assert np.bincount(y).tolist() == COUNTS
    fresh = digits()
    assert np.array_equal(fresh[0], x) and np.array_equal(fresh[1], y)


def test_digits_equal_the_shared_copy(digits_npz: Path) -> None:
    shared = shared_data("sklearn_digits/sklearn_digits.npz")
    with np.load(shared) as a, np.load(digits_npz) as b:
        for key in ("x", "y"):
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
            assert a[key].tobytes() == b[key].tobytes(), key
