"""Tests for selfclust.labels.manifold: UMAP + GMM beats k-means on real digits, the k-NN vote
against brute force, and 2 gloo ranks give the labels of 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from selfclust.collectives import WORLD
from selfclust.eval.metrics import clustering_scores
from selfclust.labels.kmeans import kmeans
from selfclust.labels.manifold import (
    cluster_pool,
    consensus_scores,
    manifold_labels,
    match_ids,
    vote,
)
from tests.helpers.data import digits as load_digits
from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits()
    return x.reshape(len(x), -1).astype(np.float32), y.astype(np.int64)


def test_umap_gmm_beats_kmeans_on_digits(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    labels = cluster_pool(x, 10, seed=0, neighbors=15)
    ours = clustering_scores(y, labels)["acc"]
    km = kmeans(torch.from_numpy(x), 10, niter=50, seed=0)
    base = clustering_scores(y, torch.cdist(torch.from_numpy(x), km.centroids).argmin(1).numpy())
    assert ours > base["acc"] + 0.05, (ours, base)
    assert np.array_equal(labels, cluster_pool(x, 10, seed=0, neighbors=15))  # deterministic


@pytest.fixture(scope="module")
def candidates(digits: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """900 digits and the partitions of cluster_pool's 3 candidate seeds (seed, seed+7919,
    seed+2·7919), each computed alone."""
    x = digits[0][:900]
    return x, [cluster_pool(x, 10, seed=7919 * c, neighbors=15) for c in range(3)]


def _ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index from its formula (Hubert & Arabie 1985), float64 pair counts."""
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    pairs = lambda v: (v * (v - 1) / 2).sum()  # noqa: E731
    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), len(a)
    expected = rows * cols / (total * (total - 1) / 2)
    return float((both - expected) / ((rows + cols) / 2 - expected))


def test_candidates_keep_the_best_cosine_silhouette(candidates) -> None:  # noqa: ANN001
    """select=silhouette (the default): the kept partition is the candidate whose cosine silhouette,
    computed here by sklearn on all rows, is highest (here the third: keeping the first
    would fail)."""
    from sklearn.metrics import silhouette_score

    x, each = candidates
    scores = [silhouette_score(x, p, metric="cosine") for p in each]
    assert len({round(s, 6) for s in scores}) == 3, scores  # the choice is not a tie
    kept = cluster_pool(x, 10, seed=0, neighbors=15, candidates=3)
    assert np.array_equal(kept, each[int(np.argmax(scores))]), scores


def test_candidates_keep_the_consensus(candidates) -> None:  # noqa: ANN001
    """select=consensus: the kept partition is the candidate with the highest
    mean adjusted Rand index to the other two, the index written out from its formula."""
    x, each = candidates
    mean = [np.mean([_ari(p, q) for j, q in enumerate(each) if j != i]) for i, p in enumerate(each)]
    assert np.allclose(consensus_scores(each), mean, atol=1e-12), (consensus_scores(each), mean)
    assert len({round(m, 9) for m in mean}) == 3, mean  # the choice is not a tie
    kept = cluster_pool(x, 10, seed=0, neighbors=15, candidates=3, select="consensus")
    assert np.array_equal(kept, each[int(np.argmax(mean))]), mean


def test_consensus_keeps_the_majority_partition() -> None:
    """Two partitions equal up to renamed ids and one that merges two of their classes and
    splits the merged cluster: a member of the agreeing pair scores highest; two candidates
    are refused."""
    good = np.repeat(np.arange(5), 40)
    renamed = (good + 2) % 5
    bad = good.copy()
    bad[bad == 1] = 0
    bad[:20] = 1  # half of class 0 becomes its own cluster
    scores = consensus_scores([bad, good, renamed])
    assert scores[1] == scores[2] > scores[0], scores
    x = np.random.default_rng(0).random((60, 4), np.float32)
    with pytest.raises(ValueError, match="3 or more"):
        cluster_pool(x, 3, 0, 10, candidates=2, select="consensus")


def test_vote_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    pool = torch.nn.functional.normalize(torch.randn(200, 8, generator=g), dim=1)
    labels = torch.randint(0, 5, (200,), generator=g)
    x = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    got = vote(pool, labels, x, 5, neighbours=7)
    sim = (x @ pool.t()).double()
    top = sim.topk(7, dim=1)
    expect = torch.zeros(50, 5, dtype=torch.float64)
    for i in range(50):
        for s, j in zip(top.values[i], top.indices[i], strict=True):
            expect[i, labels[j]] += max(float(s), 0.0) + 1e-6
    assert torch.equal(got, expect.argmax(1))
    two = torch.stack([labels, (labels + 1) % 5])  # [T, P]: one search, a vote per head
    both = vote(pool, two, x, 5, neighbours=7)
    assert torch.equal(both[0], got) and torch.equal(both[1], vote(pool, two[1], x, 5, 7))


def test_match_ids_undoes_a_permutation() -> None:
    g = torch.Generator().manual_seed(1)
    old = torch.randint(0, 7, (500,), generator=g).numpy()
    perm = torch.randperm(7, generator=g).numpy()
    noisy = perm[old].copy()
    noisy[:40] = (noisy[:40] + 1) % 7  # 8 % of the samples moved: the ids still match
    renamed = match_ids(noisy, old, 7)
    assert (renamed == old).mean() == (noisy == perm[old]).mean()


def test_too_few_samples_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="kmeans_samples"):
        cluster_pool(np.zeros((8, 3), np.float32), 10, seed=0)


def _depict_runner(samples: int) -> Any:
    """A DEPICT runner whose embedding is the 64 digit pixels (same seeded head everywhere)."""
    from selfclust.config import load_config
    from selfclust.methods.nets import build_cluster_net
    from selfclust.methods.registry import build_runner

    over = ["method.name=depict", "method.clusters=10", "method.embed_dim=64",
            "method.manifold_neighbors=15", f"method.kmeans_samples={samples}",
            "method.kmeans_restarts=2"]  # fmt: skip
    cfg = load_config(None, over)
    torch.manual_seed(0)
    return build_runner(cfg, build_cluster_net(cfg, 1, 8), 1797)


def _rank(rank: int, world: int, x: torch.Tensor, samples: int) -> torch.Tensor:
    """This rank's ``[idx, manifold_labels, DEPICT's manifold refresh]`` (interleaved rows:
    every rank holds part of the pool)."""
    from selfclust.labels.label_pass import Embedded

    idx = torch.arange(len(x))[rank::world]
    out = manifold_labels(x[idx], idx, 1, 10, samples, 3, len(x), neighbors=15, group=WORLD)
    emb = Embedded(features=x[idx], idx=idx, cls=torch.full_like(idx, -1))
    refreshed, _ = _depict_runner(samples).refresh(emb, manifold_seed=5)
    return torch.stack([idx, out[0], refreshed[0]])


# UMAP's numba code compiles again in each rank (~20 s; its functions are not cached)
@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = torch.from_numpy(digits[0]), digits[1]
    one = _rank(0, 1, x, 1200)  # no process group: the single-process path, in this process
    two = torch.cat(run_ranks(_rank, 2, tmp_path / "two", x, 1200), dim=1)
    a = one[1:, torch.argsort(one[0])]
    b = two[1:, torch.argsort(two[0])]
    assert torch.equal(a, b)  # both the labels and DEPICT's refreshed targets
    # 597 of 1797 rows are outside the pool and labelled by the vote: still a good partition.
    assert clustering_scores(y, a[0].numpy())["acc"] > 0.85


def test_depict_manifold_refresh(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """DEPICT's last refreshes (``method.manifold_relabels``): one-hot targets that are the
    UMAP + GMM partition of the embedding on the sample (``manifold_labels``' partition),
    its ids renamed to agree with the head's argmax as well as any renaming can (no swap of
    two ids agrees more); the next plain refresh is soft again. The test's 'embedding' is
    the 64 pixels (``embed_dim=64``)."""
    from selfclust.labels.label_pass import Embedded
    from selfclust.labels.sample import global_sample

    x, y = torch.from_numpy(digits[0]), digits[1]
    n = len(x)
    runner = _depict_runner(1200)
    emb = Embedded(features=x, idx=torch.arange(n), cls=torch.from_numpy(y))
    runner.initialise(emb)  # head fitted to a k-means partition: its argmax means something
    labels, record = runner.refresh(emb, manifold_seed=5)
    got = labels[0].numpy()
    assert runner.hard and record["labeller"] == "manifold"
    expect = manifold_labels(
        x, emb.idx, 1, 10, 1200, 5, n, neighbors=15, l2_normalize=False, group=WORLD
    )
    pairs = set(zip(expect[0].tolist(), got.tolist(), strict=True))
    assert len(pairs) == 10  # the same partition, renamed one to one
    assert clustering_scores(y, got)["acc"] > 0.85
    pool = global_sample(n, 1200, 5)[1]
    with torch.no_grad():
        head = runner.model.scores(x[pool]).argmax(1).numpy()
    agree = (got[pool] == head).mean()
    assert record["manifold_head_agreement"] == pytest.approx(agree)
    assert agree > 0.5  # k-means and UMAP + GMM on digits mostly agree
    for i in range(10):
        for j in range(i + 1, 10):
            swapped = np.where(got[pool] == i, j, np.where(got[pool] == j, i, got[pool]))
            assert (swapped == head).mean() <= agree, (i, j)
    state = runner.state_dict()
    assert state["hard"]  # the targets are the bank's labels: a resume trains on the same
    soft, _ = runner.refresh(emb)
    assert not runner.hard
    with torch.no_grad():
        assert torch.equal(soft[0], runner.model.scores(x).argmax(1))


@pytest.mark.slow
def test_worker_loop_with_manifold_label_updates(digits_npz: Path, tmp_path: Path) -> None:
    """The real worker loop (one rank, in this process): the first labels and the last label
    updates come from UMAP + GMM, the one between from Sinkhorn, and the run ends above
    raw-pixel k-means on digits (ACC 0.792, best of 5; see docs/methods.md)."""
    from selfclust.shards.write import write_shards
    from tests.helpers.spawn import train_rank

    write_shards(digits_npz, tmp_path / "shards", shard_size=500)
    over = [
        "model.arch=small_resnet",
        "model.widths=[16,32]",
        "method.heads=1",
        "method.clusters=10",
        "method.init=manifold_pixels",
        "method.relabels=3",
        "method.relabel_start=0.4",
        "method.manifold_relabels=2",
        "augment.hflip=0",
        "augment.crop_scale=[0.5,1]",
        "optim.epochs=6",
        "optim.batch_size=64",
        "checkpoint.every_steps=0",
        "wandb.mode=disabled",
    ]
    out = train_rank(0, 1, str(tmp_path / "shards"), str(tmp_path), over, None)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    updates = [json.loads(x) for x in lines if '"labeller"' in x or "sinkhorn_iters" in x]
    kinds = [u.get("labeller", "sinkhorn") for u in updates]
    assert kinds[0] == kinds[-1] == "manifold" and "sinkhorn" in kinds[1:-1], kinds
    assert updates[0]["event"] == "init_manifold_pixels"
    assert updates[0]["pseudo_acc_head0"] > 0.85  # UMAP + GMM on 8x8 pixels: 0.88
    assert out["summary"]["acc"] > 0.80, out["summary"]["acc"]  # measured 0.851


@pytest.mark.parametrize("method", ["dec", "depict", "dgg"])
def test_cluster_init_manifold(method: str, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """cluster_init=manifold for DEC/DEPICT/DGG: this rank's labels are manifold_labels' (the
    pool's by UMAP + GMM, the rest by vote), the pool's labels are those rows' labels, and the
    centroids are the clusters' means (a float64 numpy oracle). Each method's initialise
    starts from them: DEC's centroids and DGG's GMM means are those means, DEPICT's first
    targets are the partition itself."""
    from selfclust.config import load_config
    from selfclust.labels.label_pass import Embedded
    from selfclust.labels.sample import global_sample
    from selfclust.methods.nets import build_cluster_net
    from selfclust.methods.registry import build_runner

    x, y = torch.from_numpy(digits[0]), digits[1]
    over = [f"method.name={method}", "method.clusters=10", "method.embed_dim=64",
            "method.cluster_init=manifold", "method.manifold_neighbors=15",
            "method.kmeans_samples=1200"]  # fmt: skip
    cfg = load_config(None, over)
    runner = build_runner(cfg, build_cluster_net(cfg, 1, 8), len(x))
    emb = Embedded(features=x, idx=torch.arange(len(x)), cls=torch.from_numpy(y))
    mu, pool, pool_labels, own = runner._partition(emb)
    expect = manifold_labels(x, emb.idx, 1, 10, 1200, cfg.seed, len(x), neighbors=15,
                             l2_normalize=False, group=WORLD)[0]  # fmt: skip
    assert torch.equal(own, expect)
    assert torch.equal(pool_labels, own[global_sample(len(x), 1200, cfg.seed)[1]])
    assert torch.equal(pool, x[global_sample(len(x), 1200, cfg.seed)[1]])
    means = np.stack([digits[0][own.numpy() == k].astype(np.float64).mean(0) for k in range(10)])
    np.testing.assert_allclose(mu.numpy(), means, rtol=1e-5, atol=1e-5)
    assert clustering_scores(y, own.numpy())["acc"] > 0.85
    first, _ = runner.initialise(emb)
    if method == "dec":  # Student-t centroids set to those means
        assert torch.equal(runner.model.net.clustering.centroids.detach(), mu)
    elif method == "depict":  # the partition is the first target
        assert torch.equal(first[0], own)
    else:  # DGG's GMM prior: the partition's means (its first labels are the classifier's)
        prior_mean = runner._model(runner.model).prior.mean.detach().numpy()
        np.testing.assert_allclose(prior_mean, means, rtol=1e-5, atol=1e-5)
