"""Clustering metrics against ground truth (evaluation only, never training)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import (
    adjusted_mutual_info_score,
    adjusted_rand_score,
    normalized_mutual_info_score,
)
from sklearn.metrics.cluster import contingency_matrix


def cluster_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """ACC: the best one-to-one map of clusters to classes (Hungarian, scipy)."""
    c = contingency_matrix(y_true, y_pred)  # [classes, clusters]
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].sum() / len(y_true))


def majority_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Each cluster votes for its most frequent class (for K ≠ number of classes)."""
    c = contingency_matrix(y_true, y_pred)
    return float(c.max(axis=0).sum() / len(y_true))


def clustering_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """ACC, NMI, ARI (and majority-vote accuracy and AMI) of one partition."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.shape=} and {y_pred.shape=} differ")
    return {
        "acc": cluster_accuracy(y_true, y_pred),
        "nmi": float(normalized_mutual_info_score(y_true, y_pred)),
        "ari": float(adjusted_rand_score(y_true, y_pred)),
        "ami": float(adjusted_mutual_info_score(y_true, y_pred)),
        "majority_acc": majority_accuracy(y_true, y_pred),
    }


def head_agreement(preds: np.ndarray) -> dict[str, Any]:
    """How alike the heads' partitions are: NMI and ARI for every pair of heads ``[T, N]``
    (1 = the same partition up to renaming), with their means and minima."""
    t = len(preds)
    pairs, nmi, ari = [], [], []
    for i in range(t):
        for j in range(i + 1, t):
            nmi.append(float(normalized_mutual_info_score(preds[i], preds[j])))
            ari.append(float(adjusted_rand_score(preds[i], preds[j])))
            pairs.append({"heads": [i, j], "nmi": nmi[-1], "ari": ari[-1]})
    if not pairs:
        return {"pairs": []}
    return {
        "nmi_mean": float(np.mean(nmi)),
        "nmi_min": float(np.min(nmi)),
        "ari_mean": float(np.mean(ari)),
        "ari_min": float(np.min(ari)),
        "pairs": pairs,
    }


def matched_confusion(
    y_true: np.ndarray, y_pred: np.ndarray, clusters: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contingency counts ``[classes, clusters]`` with the clusters reordered for reading:
    first the cluster Hungarian-matched to class 0, 1, ..., then the unmatched ones by their
    dominant class. Returns (counts, class ids, cluster ids in column order)."""
    classes = np.unique(y_true)
    row = np.searchsorted(classes, y_true)
    counts = np.zeros((len(classes), clusters), dtype=np.int64)
    np.add.at(counts, (row, y_pred), 1)
    r, c = linear_sum_assignment(counts, maximize=True)
    matched = list(c[np.argsort(r)])
    rest = [k for k in range(clusters) if k not in set(matched)]
    rest.sort(key=lambda k: (int(counts[:, k].argmax()), -int(counts[:, k].max())))
    order = np.array(matched + rest, dtype=np.int64)
    return counts[:, order], classes, order


def size_stats(pred: np.ndarray, clusters: int) -> dict[str, float]:
    """Cluster-size spread: min, max, and normalised entropy (1 = perfectly equal sizes)."""
    sizes = np.bincount(pred, minlength=clusters).astype(np.float64)
    p = sizes / sizes.sum()
    nz = p[p > 0]
    return {
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "size_entropy": float(-(nz * np.log(nz)).sum() / np.log(clusters)),
    }
