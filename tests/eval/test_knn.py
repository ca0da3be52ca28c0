"""Weighted k-NN (faiss, distributed merge) against a brute-force float64 numpy version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from selfclust.collectives import WORLD
from selfclust.eval.knn import knn_accuracy, knn_votes, topk_accuracy
from tests.helpers.spawn import run_ranks


def brute_votes(train, ytrain, queries, k, t, classes):
    """Cosine similarity to every training row, k largest, weights exp(sim / t), per class."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ a.astype(np.float64).T
    top = np.argsort(-sims, axis=1)[:, :k]
    votes = np.zeros((len(q), classes))
    for i, row in enumerate(top):
        for j in row:
            votes[i, ytrain[j]] += np.exp(sims[i, j] / t)
    return votes


def data(seed=0, n=300, m=80, d=12, classes=5):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d))
    ytr, yq = rng.integers(0, classes, n), rng.integers(0, classes, m)
    tr = (centers[ytr] + 1.2 * rng.normal(size=(n, d))).astype(np.float32)
    q = (centers[yq] + 1.2 * rng.normal(size=(m, d))).astype(np.float32)
    return tr, ytr, q, yq


@pytest.mark.parametrize("k", [1, 20, 200])
def test_votes_match_brute_force(k):
    tr, ytr, q, _ = data()
    got = knn_votes(
        torch.from_numpy(tr), torch.from_numpy(ytr), torch.from_numpy(q), k, 0.07, 5, group=WORLD
    )
    want = brute_votes(tr, ytr, q, k, 0.07, 5)
    # relative: weights exp(sim / 0.07) span many orders of magnitude
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-4)


def test_topk_accuracy_hand_checked():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.04, 0.06], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc["top1"] == pytest.approx(1 / 3)
    assert acc["top2"] == pytest.approx(2 / 3)  # rows 0 and 1
    assert acc["top5"] == 1.0  # capped at the 3 classes


def test_errors_are_clear():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="exceeds the 5 training"):
        knn_votes(x, torch.zeros(5, dtype=torch.int64), x, 6, 0.07, 2, group=WORLD)
    with pytest.raises(ValueError, match="temperature"):
        knn_votes(x, torch.zeros(5, dtype=torch.int64), x, 2, 0.0, 2, group=WORLD)


def _ranks(rank, world, tr, ytr, q, yq):
    # uneven split of both training rows and queries; queries concatenate in rank order
    cut_t, cut_q = [0, 70, len(tr)], [0, 50, len(q)]
    mine_t = slice(cut_t[rank], cut_t[rank + 1])
    mine_q = slice(cut_q[rank], cut_q[rank + 1])
    args = (
        torch.from_numpy(tr[mine_t]),
        torch.from_numpy(ytr[mine_t]),
        torch.from_numpy(q[mine_q]),
    )
    votes = knn_votes(*args, 20, 0.07, 5, group=WORLD)
    acc = knn_accuracy(*args, torch.from_numpy(yq[mine_q]), 5, ks=(20, 200), group=WORLD)
    return votes, acc


def test_two_ranks_equal_one(tmp_path: Path):
    tr, ytr, q, yq = data(1)
    t = torch.from_numpy
    single = knn_votes(t(tr), t(ytr), t(q), 20, 0.07, 5, group=WORLD)
    acc1 = knn_accuracy(t(tr), t(ytr), t(q), t(yq), 5, ks=(20, 200), group=WORLD)
    results = run_ranks(_ranks, 2, tmp_path, tr, ytr, q, yq)
    for votes, acc in results:
        torch.testing.assert_close(votes, single, rtol=1e-6, atol=0)
        assert acc == acc1
    assert acc1["k20"]["top1"] > 0.6  # the clusters are separable enough to be learnt
