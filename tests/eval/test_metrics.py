import itertools

import numpy as np
import pytest

from selfclust.eval.metrics import (
    cluster_accuracy,
    clustering_scores,
    majority_accuracy,
    size_stats,
)


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


def test_hand_checked_nmi_ari_ami_against_sklearn():
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    y = np.array([0, 0, 1, 1])
    p = np.array([0, 0, 1, 2])  # K = 3 > 2 classes: a refinement of the classes
    s = clustering_scores(y, p)
    # by hand: H(Y) = ln 2, H(P) = 1.5 ln 2, I = ln 2 (P determines Y): NMI = 2/2.5
    assert s["nmi"] == pytest.approx(0.8)
    # by hand: sum C(n_ij,2) = 1, rows 2, cols 1, C(4,2) = 6: (1 - 1/3) / (1.5 - 1/3) = 4/7
    assert s["ari"] == pytest.approx(4 / 7)
    assert s["ari"] == pytest.approx(adjusted_rand_score(y, p))
    assert s["ami"] == pytest.approx(adjusted_mutual_info_score(y, p))
    assert s["majority_acc"] == 1.0 and s["acc"] == pytest.approx(3 / 4)
    assert s["ami"] < s["nmi"]  # AMI discounts what chance alone gives K = 3 clusters


def test_perfect_permuted_random_ami_and_majority():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, 3000)
    for p in (y, np.array([3, 5, 0, 1, 2, 4])[y]):
        s = clustering_scores(y, p)
        assert s["ami"] == pytest.approx(1.0) and s["majority_acc"] == 1.0
    s = clustering_scores(y, rng.integers(0, 12, 3000))  # random, K = 2 x classes
    assert abs(s["ami"]) < 0.01 and s["nmi"] > s["ami"]  # NMI's chance level grows with K
    assert s["majority_acc"] < 0.25


def test_majority_matches_brute_force():
    rng = np.random.default_rng(2)
    y, p = rng.integers(0, 4, 500), rng.integers(0, 9, 500)
    want = sum(max((y[p == k] == c).sum() for c in range(4)) for k in range(9)) / 500
    assert majority_accuracy(y, p) == pytest.approx(want)


def test_head_agreement():
    from selfclust.eval.metrics import head_agreement

    a = np.array([0, 0, 1, 1, 2, 2])
    preds = np.stack([a, (a + 1) % 3, np.array([0, 1, 0, 1, 0, 1])])
    h = head_agreement(preds)
    assert [p["heads"] for p in h["pairs"]] == [[0, 1], [0, 2], [1, 2]]
    assert h["pairs"][0]["nmi"] == pytest.approx(1.0) and h["pairs"][0]["ari"] == pytest.approx(1)
    assert h["pairs"][1]["nmi"] == pytest.approx(0.0, abs=1e-12)  # independent partitions
    assert h["nmi_min"] == pytest.approx(0.0, abs=1e-12)
    assert h["nmi_mean"] == pytest.approx(1 / 3)
    assert head_agreement(a[None]) == {"pairs": []}


def test_matched_confusion_orders_columns_by_class():
    from selfclust.eval.metrics import matched_confusion

    y = np.array([0, 0, 1, 1, 2, 2, 2])
    p = np.array([2, 2, 0, 0, 1, 1, 3])  # cluster 3: an extra one, mostly class 2
    counts, classes, order = matched_confusion(y, p, 4)
    assert order.tolist() == [2, 0, 1, 3] and classes.tolist() == [0, 1, 2]
    assert counts.tolist() == [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 1]]
