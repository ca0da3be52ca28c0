import itertools

import numpy as np
import pytest

from selfclust.metrics import cluster_accuracy, clustering_scores, majority_accuracy, size_stats


def brute_force_acc(y, p):
    """Try every one-to-one map of clusters to classes (small K only)."""
    k = max(y.max(), p.max()) + 1
    best = 0
    for perm in itertools.permutations(range(k)):
        best = max(best, int((np.array(perm)[p] == y).sum()))
    return best / len(y)


def test_perfect_and_permuted():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    s = clustering_scores(y, y)
    assert s["acc"] == 1.0 and s["nmi"] == pytest.approx(1.0) and s["ari"] == pytest.approx(1.0)
    perm = np.array([2, 0, 1])[y]
    s = clustering_scores(y, perm)
    assert s["acc"] == 1.0 and s["nmi"] == pytest.approx(1.0) and s["ari"] == pytest.approx(1.0)


def test_acc_matches_brute_force_on_random():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 5, 200)
        p = rng.integers(0, 5, 200)
        assert cluster_accuracy(y, p) == pytest.approx(brute_force_acc(y, p))
    s = clustering_scores(y, p)
    assert s["ari"] < 0.05 and s["nmi"] < 0.1  # random partitions score near zero


def test_hand_checked_case():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([1, 1, 0, 0, 0, 0])
    # best map: cluster 1 -> class 0 (2 right), cluster 0 -> class 1 (3 right) = 5/6
    assert cluster_accuracy(y, p) == pytest.approx(5 / 6)
    # majority vote with more clusters than classes
    p2 = np.array([0, 1, 2, 3, 3, 4])
    assert majority_accuracy(y, p2) == 1.0
    # one-to-one: cluster 3 -> class 1 (2 right), one singleton -> class 0 (1 right)
    assert cluster_accuracy(y, p2) == pytest.approx(3 / 6)


def test_size_stats():
    s = size_stats(np.array([0, 0, 1, 1]), 2)
    assert s["size_min"] == 2 and s["size_max"] == 2 and s["size_entropy"] == pytest.approx(1.0)
    s = size_stats(np.array([0, 0, 0, 0]), 2)
    assert s["size_min"] == 0 and s["size_entropy"] == pytest.approx(0.0)
