"""Weighted k-nearest-neighbour classifier on frozen features (the DINO / InstDisc protocol).

Features are L2-normalised, so faiss's inner product is the cosine similarity. Each of the k
nearest training samples votes for its class with weight ``exp(sim / T)``; the class with the
largest total wins (top-5: the five largest).

Distributed: every rank keeps its own training rows. The queries (the smaller evaluation set)
are all-gathered, each rank searches only its rows (faiss ``IndexFlatIP``), and the per-rank
top-k lists ``[n_q, k]`` are all-gathered and merged, so no rank ever holds all training
features. At world size 1 it is a plain faiss search.
"""

from __future__ import annotations

import numpy as np
import torch

from selfclust import collectives as C


def _local_topk(train: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """This rank's k best (similarity, row) per query; padded with -inf when it has < k rows."""
    import faiss

    n_q = queries.shape[0]
    sims = torch.full((n_q, k), float("-inf"))
    rows = torch.zeros((n_q, k), dtype=torch.int64)
    kk = min(k, train.shape[0])
    if kk > 0:
        index = faiss.IndexFlatIP(train.shape[1])
        index.add(np.ascontiguousarray(train.numpy(), dtype=np.float32))
        d, i = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), kk)
        sims[:, :kk] = torch.from_numpy(d)
        rows[:, :kk] = torch.from_numpy(i)
    return sims, rows


def knn_votes(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    group: C.Group,
) -> torch.Tensor:
    """Class votes ``[n_q_total, num_classes]`` for the queries of all ranks, in rank order.

    ``train``: this rank's ``[n_r, D]`` features, ``train_labels`` ``[n_r]``; ``queries``: this
    rank's ``[m_r, D]``. Features are L2-normalised here. Collective over ``group``: two
    all-gathers, of the queries and of ``[n_q, k]`` (similarity, label) pairs per rank.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, T={temperature}")
    train = torch.nn.functional.normalize(train.float().cpu(), dim=1)
    queries = torch.nn.functional.normalize(queries.float().cpu(), dim=1)
    queries = C.all_gather_cat(queries, group)  # [n_q, D]: every rank searches for all of them
    sims, rows = _local_topk(train, queries, k)
    labels = train_labels.cpu().long()[rows] if len(train_labels) else torch.zeros_like(rows)
    ws = C.world_size(group)
    both = torch.stack([sims, labels.double()], dim=-1).double()  # [n_q, k, 2]
    both = C.all_gather_cat(both, group).view(ws, -1, k, 2).permute(1, 0, 2, 3)
    both = both.reshape(queries.shape[0], ws * k, 2)
    n_total = C.all_reduce_sum(torch.tensor([train.shape[0]]), group)
    if int(n_total) < k:
        raise ValueError(f"k={k} exceeds the {int(n_total)} training samples")
    top, pos = both[..., 0].topk(k, dim=1)  # merge the ranks' lists: [n_q, k]
    lab = both[..., 1].gather(1, pos).long()
    weights = torch.exp(top / temperature)
    votes = torch.zeros(queries.shape[0], num_classes, dtype=torch.float64)
    return votes.scatter_add_(1, lab, weights)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """``{"top1": ..., "top5": ...}``: fraction whose label is among the k highest scores
    (k capped at the number of classes)."""
    out = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (scores.topk(kk, dim=1).indices == labels[:, None]).any(1)
        out[f"top{k}"] = float(hit.double().mean())
    return out


def knn_accuracy(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    ks: tuple[int, ...] = (20, 200),
    temperature: float = 0.07,
    *,
    group: C.Group,
) -> dict[str, dict[str, float]]:
    """Top-1/top-5 of the weighted k-NN classifier for each k, e.g. ``{"k20": {...}}``.
    k larger than the training set is capped at its size. Collective over ``group``."""
    n_train = int(C.all_reduce_sum(torch.tensor([train.shape[0]]), group))
    y = C.all_gather_cat(query_labels.cpu().long(), group)
    out = {}
    for k in ks:
        votes = knn_votes(
            train, train_labels, queries, min(k, n_train), temperature, num_classes, group
        )
        out[f"k{k}"] = topk_accuracy(votes, y)
    return out
