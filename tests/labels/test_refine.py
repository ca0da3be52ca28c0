"""Refining SeLa's heads by spherical k-means from the current labels: against a float64 numpy
transcription of Lloyd's algorithm, and the same centres and labels on 1, 2 and 3 gloo ranks
(one of them empty)."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from tests.helpers.spawn import run_ranks


def _digits():
    x, _ = load_digits(return_X_y=True)
    f = torch.tensor(x, dtype=torch.float32) + 0.1
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 10, (len(f),), generator=g)  # a poor partition to refine
    return f, start


def _oracle(f: np.ndarray, labels: np.ndarray, k: int, iters: int):
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    for _ in range(iters):
        c = np.zeros((k, f.shape[1]))
        np.add.at(c, labels, f)
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        new = (f @ c.T).argmax(1)
        if (new == labels).all():
            break
        labels = new
    return c, labels


def test_refine_matches_lloyd_in_float64():
    from selfclust.collectives import WORLD
    from selfclust.labels.refine import refine_centres

    f, start = _digits()
    centres, iters = refine_centres(f, start, 10, WORLD, iters=50)
    c64, labels64 = _oracle(f.double().numpy(), start.numpy(), 10, 50)
    assert 1 < iters < 50
    np.testing.assert_allclose(centres.numpy(), c64, atol=1e-5)
    got = (torch.nn.functional.normalize(f, dim=1) @ centres.T).argmax(1).numpy()
    assert (got == labels64).all()
    # refinement moves the partition: most of the random start changes
    assert (labels64 != start.numpy()).mean() > 0.5


def _rank(rank, world, f, start, cuts):
    import torch

    from selfclust.collectives import WORLD
    from selfclust.labels.refine import refine_centres

    lo, hi = cuts[rank], cuts[rank + 1]
    centres, iters = refine_centres(f[lo:hi], start[lo:hi], 10, WORLD, iters=50)
    labels = (torch.nn.functional.normalize(f[lo:hi], dim=1) @ centres.T).argmax(1)
    return centres, labels, iters


@pytest.mark.parametrize("cuts", [[0, 900, 1797], [0, 600, 600, 1797]], ids=["2", "3-empty"])
def test_refine_same_on_1_2_3_ranks(tmp_path, cuts):
    from selfclust.collectives import WORLD
    from selfclust.labels.refine import refine_centres

    f, start = _digits()
    centres, iters = refine_centres(f, start, 10, WORLD, iters=50)
    single = (torch.nn.functional.normalize(f, dim=1) @ centres.T).argmax(1)
    out = run_ranks(_rank, len(cuts) - 1, tmp_path, f, start, cuts)
    assert torch.equal(torch.cat([labels for _, labels, _ in out]), single)
    for c, _, n in out:
        torch.testing.assert_close(c, centres, atol=1e-6, rtol=0)
        assert n == iters


def _heads(f, start, idx, restarts):
    import torch

    from selfclust.collectives import WORLD
    from selfclust.labels.refine import RefinePlan, heads_to_centres

    torch.manual_seed(0)
    heads = torch.nn.ModuleList([torch.nn.Linear(64, 10), torch.nn.Linear(64, 10)])
    labels = torch.stack([start, (start * 7 + 3) % 10])
    plan = RefinePlan(clusters=10, restarts=restarts, samples=1000, num_samples=1797, seed=5)
    record = heads_to_centres(heads, f, idx, labels, plan, WORLD)
    return [h.weight.detach().clone() for h in heads], record


def _heads_rank(rank, world, f, start, cuts, restarts):
    lo, hi = cuts[rank], cuts[rank + 1]
    return _heads(f[lo:hi], start[lo:hi], torch.arange(lo, hi), restarts)


def test_heads_take_the_best_centres_and_keep_their_ids():
    from selfclust.collectives import WORLD
    from selfclust.labels.refine import refine_centres

    f, start = _digits()
    idx = torch.arange(len(f))
    weights, record = _heads(f, start, idx, restarts=0)
    centres, _ = refine_centres(f, start, 10, WORLD)
    nearest = (torch.nn.functional.normalize(f, dim=1) @ centres.T).argmax(1)
    assert torch.equal((f @ weights[0].T).argmax(1), nearest)  # the head scores its centres
    assert record["kmeans_restart_wins"] == 0
    weights, record = _heads(f, start, idx, restarts=3)
    assert record["kmeans_restart_wins"] >= 1  # from a random start, a restart is better
    # the winner's ids follow the current labels: their overlap is on the diagonal
    new = (f @ weights[0].T).argmax(1)
    overlap = torch.zeros(10, 10)
    overlap.index_put_((new, nearest), torch.ones(len(new)), accumulate=True)
    assert overlap.diagonal().sum() >= overlap.sum(0).max()


@pytest.mark.parametrize("cuts", [[0, 900, 1797], [0, 600, 600, 1797]], ids=["2", "3-empty"])
def test_heads_same_on_1_2_3_ranks(tmp_path, cuts):
    f, start = _digits()
    single, record = _heads(f, start, torch.arange(len(f)), 3)
    for weights, rec in run_ranks(_heads_rank, len(cuts) - 1, tmp_path, f, start, cuts, 3):
        assert rec == pytest.approx(record)
        for w, w1 in zip(weights, single, strict=True):
            torch.testing.assert_close(w, w1, atol=1e-5, rtol=0)
