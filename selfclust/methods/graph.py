"""DGG's graph term: a k-NN graph over embeddings (faiss) and a divergence between the cluster
posteriors of neighbours, with the graph and the posteriors kept distributed.

Graph build (:func:`knn_graph`, at a refresh): every rank keeps its own ``[n_r, D]`` rows as
queries; the ranks take turns broadcasting their rows, each rank searches its queries in the
broadcast block with a faiss ``IndexFlatL2`` and merges the block's top-k into its running top-k.
The result is the exact global graph (the same as one process on all rows), peak memory is one
block, and no rank ever holds all N × D features at once (the traffic equals an all-gather).

Weights (:func:`similarity_weights`): ``w_ij = exp(−‖z_i − z_j‖² / σ_i²)`` with ``σ_i`` the
distance to i's ``sigma_rank``-th neighbour (DGG's code takes σ from a fixed neighbour rank).

Posteriors of neighbours (:func:`fetch_rows`, every step): a neighbour j of a batch sample may
belong to any rank. Each rank keeps the refresh-time posteriors of *its own* label-pass rows
(``[n_r, K]``: nothing N × K is ever gathered) and a step fetches just the rows its batch needs:
the requested indices are all-gathered (``B·k`` ints per rank), each rank fills the rows it
owns, and an all-reduce returns them. Cost per step: ``world · B · k · (K + 1)`` floats in the
all-reduce. The alternative — a graph per rank over its own rows, posteriors local — costs no
step traffic but loses exactness (neighbours from 1/world of the data) and makes the result
depend on the worker count; an ``all_to_all`` would cut the traffic to ``B·k·K`` per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selfclust import collectives as C


@dataclass
class KNNGraph:
    neighbours: torch.Tensor  # [n_r, k] int64 global sample indices, nearest first
    sq_distances: torch.Tensor  # [n_r, k] float32 squared Euclidean distances


def _search(block: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    import faiss

    index = faiss.IndexFlatL2(block.shape[1])
    index.add(np.ascontiguousarray(block.numpy(), dtype=np.float32))
    d, i = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
    return torch.from_numpy(d), torch.from_numpy(i)


def knn_graph(features: torch.Tensor, idx: torch.Tensor, k: int, group: C.Group) -> KNNGraph:
    """Exact k nearest neighbours (self excluded) of this rank's rows among all ranks' rows.

    Collective over ``group``: one all-gather of the row counts, then one broadcast per rank
    of its ``[n_r, D]`` features and ``[n_r]`` indices.
    """
    x = features.detach().float().cpu()
    idx = idx.cpu().long()
    n_r = x.shape[0]
    counts = C.all_gather_cat(torch.tensor([n_r], dtype=torch.int64), group).tolist()
    if k < 1 or k >= sum(counts):
        raise ValueError(f"k-NN graph needs 1 <= k < N={sum(counts)}, got k={k}")
    best_d = torch.full((n_r, k + 1), float("inf"))
    best_i = torch.full((n_r, k + 1), -1, dtype=torch.int64)
    me = C.rank(group)
    for src, size in enumerate(counts):
        block = x if src == me else torch.empty(size, x.shape[1])
        block_idx = idx if src == me else torch.empty(size, dtype=torch.int64)
        C.broadcast(block, src, group)
        C.broadcast(block_idx, src, group)
        if size == 0 or n_r == 0:
            continue
        d, i = _search(block, x, min(k + 1, size))
        cand_d = torch.cat([best_d, d], dim=1)
        cand_i = torch.cat([best_i, block_idx[i]], dim=1)
        order = torch.sort(cand_d, dim=1, stable=True).indices[:, : k + 1]
        best_d, best_i = cand_d.gather(1, order), cand_i.gather(1, order)
    # Drop self (the query's own index); if self is not among the k+1 (exact duplicates
    # ranked ahead of it), drop the farthest instead.
    is_self = best_i == idx[:, None]
    drop = torch.where(is_self.any(1), is_self.float().argmax(1), torch.full((n_r,), k))
    keep = torch.ones_like(best_i, dtype=torch.bool)
    keep[torch.arange(n_r), drop] = False
    return KNNGraph(best_i[keep].view(n_r, k), best_d[keep].view(n_r, k).clamp_min(0.0))


def similarity_weights(sq_distances: torch.Tensor, sigma_rank: int | None = None) -> torch.Tensor:
    """``w_ij = exp(−d_ij² / σ_i²)`` ``[n, k]``, σ_i = distance to the ``sigma_rank``-th
    neighbour (1-based; default: the farthest kept one). A zero σ (duplicates) gives w = 1."""
    k = sq_distances.shape[1]
    r = k if sigma_rank is None else sigma_rank
    if not 1 <= r <= k:
        raise ValueError(f"sigma_rank must be in 1..{k}, got {r}")
    scale = sq_distances[:, r - 1 : r].clamp_min(1e-12)
    return torch.exp(-sq_distances / scale)


def fetch_rows(
    needed: torch.Tensor, owned_idx: torch.Tensor, owned_rows: torch.Tensor, group: C.Group
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[m, K]`` of the global samples ``needed`` [m], wherever they live.

    ``owned_idx`` [n_r] (sorted ascending) and ``owned_rows`` [n_r, K] are what this rank
    holds. Returns the rows and a ``found`` mask [m] (False for samples no rank holds, e.g.
    skipped as bad data; their rows are 0). Collective over ``group``: every rank calls it
    equally often.
    """
    if owned_idx.numel() > 1 and bool((owned_idx[1:] <= owned_idx[:-1]).any()):
        raise ValueError("owned_idx must be sorted and unique (sort the refresh rows by idx)")
    needed = needed.cpu().long().flatten()
    counts = C.all_gather_cat(torch.tensor([needed.numel()], dtype=torch.int64), group).tolist()
    requests = C.all_gather_cat(needed, group)  # [Σ m] every rank's requests, rank order
    k = owned_rows.shape[1]
    answer = torch.zeros(requests.numel(), k + 1, dtype=torch.float32)
    if owned_idx.numel():
        pos = torch.searchsorted(owned_idx.cpu(), requests).clamp_max(owned_idx.numel() - 1)
        mine = owned_idx.cpu()[pos] == requests
        answer[mine, :k] = owned_rows.detach().float().cpu()[pos[mine]]
        answer[mine, k] = 1.0
    C.all_reduce_sum(answer, group)
    start = sum(counts[: C.rank(group)])
    part = answer[start : start + needed.numel()]
    if bool((part[:, k] > 1.5).any()):
        raise RuntimeError("a sample index is held by two ranks: the refresh rows overlap")
    return part[:, :k], part[:, k] > 0.5


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Jensen–Shannon divergence (natural log) between rows of ``p`` and ``q`` ``[..., K]``."""
    m = 0.5 * (p + q)
    log_m = m.clamp_min(eps).log()

    def kl(a: torch.Tensor) -> torch.Tensor:
        return (torch.special.xlogy(a, a) - a * log_m).sum(-1)

    return 0.5 * kl(p) + 0.5 * kl(q)


def graph_loss(
    posterior: torch.Tensor, neighbour_posteriors: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``mean_i Σ_j w_ij JS(γ_i ‖ γ_j)`` for a batch: ``posterior`` [B, K] (with gradient),
    ``neighbour_posteriors`` [B, k, K] (refresh-time, constant), ``weights`` [B, k] (0 for
    neighbours that were not found)."""
    js = js_divergence(posterior[:, None, :], neighbour_posteriors.to(posterior.dtype))
    return (weights.to(js.dtype) * js).sum(1).mean()
