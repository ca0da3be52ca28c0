"""Tests for selfclust.kmeans: sklearn/scipy oracles on real data, heads from centroids, ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.cluster import KMeans
from torch import nn

from selfclust.kmeans import assign, assign_torch, kmeans, objective
from selfclust.labelling import Embedded, heads_from_centroids, kmeans_labels

DIGITS = Path(__file__).parents[2] / "shared" / "data" / "sklearn_digits" / "sklearn_digits.npz"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    x = np.load(DIGITS)["x"].reshape(1797, -1).astype(np.float32)  # [1797, 64] pixel values
    return torch.from_numpy(x)


def test_torch_fallback_equals_sklearn_lloyd_from_same_start(digits: torch.Tensor) -> None:
    for seed in (0, 1):
        ours = kmeans(digits, 10, niter=25, seed=seed, backend="torch")
        assert ours.backend == "torch-cpu"
        # kmeans_torch starts from k distinct points of a seeded permutation, as faiss does.
        start = digits[torch.randperm(1797, generator=torch.Generator().manual_seed(seed))[:10]]
        ref = KMeans(10, init=start.numpy(), n_init=1, max_iter=25, tol=0, algorithm="lloyd")
        ref.fit(digits.numpy())
        ref_obj = objective(digits, torch.from_numpy(ref.cluster_centers_))
        assert ours.objective == pytest.approx(ref_obj, rel=1e-5)
        assert ours.objective == pytest.approx(ref.inertia_, rel=1e-3)  # sklearn's own number
        assert np.allclose(ours.centroids.numpy(), ref.cluster_centers_, atol=1e-3)


def test_faiss_objective_matches_sklearn(digits: torch.Tensor) -> None:
    ours = [kmeans(digits, 10, niter=25, seed=s) for s in range(3)]
    assert {r.backend for r in ours} == {"faiss-cpu"}
    ref = [
        KMeans(10, init="random", n_init=1, max_iter=25, random_state=s).fit(digits.numpy())
        for s in range(3)
    ]
    ours_mean = np.mean([r.objective for r in ours])
    ref_mean = np.mean([r.inertia_ for r in ref])
    assert abs(ours_mean / ref_mean - 1) < 0.02, (ours_mean, ref_mean)
    # the objective we report is the one of the centroids we return
    assert ours[0].objective == pytest.approx(objective(digits, ours[0].centroids), rel=1e-6)


def test_assign_is_nearest_centroid(digits: torch.Tensor) -> None:
    c = kmeans(digits, 10, niter=5, seed=0).centroids
    d = cdist(digits.numpy().astype(np.float64), c.numpy().astype(np.float64), "sqeuclidean")
    best = d.min(axis=1)
    for labels in (assign(digits, c), assign_torch(digits, c)):
        assert labels.dtype == torch.int64 and labels.shape == (1797,)
        # ties aside, the chosen centroid is the nearest one (float32 distances)
        assert np.allclose(d[np.arange(1797), labels.numpy()], best, rtol=1e-5, atol=1e-3)


def test_bad_input_raises() -> None:
    x = torch.randn(50, 4)
    x[3, 1] = float("nan")
    x[9, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 row\(s\) with NaN or inf"):
        kmeans(x, 5)
    with pytest.raises(ValueError, match=r"k=60, n=50"):
        kmeans(torch.randn(50, 4), 60)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(torch.randn(50), 5)


def test_duplicate_points_leave_no_nan(digits: torch.Tensor) -> None:
    x = torch.cat([digits[:5].repeat(40, 1), digits[5:100]])  # many exact duplicates
    res = kmeans(x, 20, niter=10, seed=0, backend="torch")
    assert torch.isfinite(res.centroids).all()
    assert res.objective <= objective(x, x[:20]) + 1e-3  # better than the trivial start


def test_heads_from_centroids_reproduce_kmeans_labels(digits: torch.Tensor) -> None:
    emb = Embedded(digits, torch.arange(1797), torch.full((1797,), -1))
    heads = nn.ModuleList([nn.Linear(64, 10) for _ in range(2)])
    labels = kmeans_labels(emb, 2, 10, 1797, 0, 1797, l2_normalize=False, init_heads=heads)
    with torch.no_grad():
        pred = torch.stack([h(digits).argmax(1) for h in heads])
    assert (pred == labels).double().mean() >= 0.999  # argmax of the head = nearest centroid
    with pytest.raises(ValueError, match="cannot initialise a head"):
        heads_from_centroids(nn.ModuleList([nn.Linear(8, 10)]), torch.zeros(1, 10, 64), 1, True)


def test_heads_from_centroids_on_normalised_features() -> None:
    # Features of one norm s: the head on raw features picks the nearest normalised centroid.
    g = torch.Generator().manual_seed(0)
    f = 7.0 * torch.nn.functional.normalize(torch.randn(2000, 16, generator=g), dim=1)
    emb = Embedded(f, torch.arange(2000), torch.full((2000,), -1))
    heads = nn.ModuleList([nn.Linear(16, 12)])
    labels = kmeans_labels(emb, 1, 12, 2000, 3, 2000, l2_normalize=True, init_heads=heads)
    with torch.no_grad():
        assert (heads[0](f).argmax(1) == labels[0]).double().mean() >= 0.999


class _CallsKMeans(torch.utils.data.Dataset[str]):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> str:
        try:
            kmeans(torch.zeros(20, 2), 2)  # raises before faiss or OpenMP runs
        except RuntimeError as err:
            return str(err)
        return "no error"


def test_refuses_to_run_in_a_loader_worker() -> None:
    loader = torch.utils.data.DataLoader(
        _CallsKMeans(), batch_size=None, num_workers=1, multiprocessing_context="fork"
    )
    assert "inside a DataLoader worker" in next(iter(loader))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kmeans_matches_cpu(digits: torch.Tensor) -> None:
    cpu = kmeans(digits, 10, niter=25, seed=0, backend="torch")
    gpu = kmeans(digits.cuda(), 10, niter=25, seed=0, backend="torch")
    assert gpu.backend == "torch-cuda"
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-3)
    auto = kmeans(digits.cuda(), 10, niter=25, seed=0)  # faiss-gpu if installed, else torch
    assert auto.backend in ("faiss-gpu", "torch-cuda")
    labels = assign(digits.cuda(), cpu.centroids)
    assert (labels == assign(digits, cpu.centroids)).double().mean() >= 0.999
