"""The label pass on 2 and 3 gloo ranks equals the single-process label pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from selfclust.collectives import WORLD
from selfclust.config import ModelConfig
from selfclust.data.shardset import ShardSet
from selfclust.data.streams import eval_batches
from selfclust.labels.bank import LabelBank
from selfclust.labels.label_pass import embed, gather_bank, kmeans_labels
from selfclust.labels.sinkhorn import sinkhorn_labels
from selfclust.labels.sinkhorn_logits import head_logits
from selfclust.models.selflabel import SelfLabelNet
from selfclust.shards.write import write_shards


@pytest.fixture(scope="module")
def shards(digits_npz: Path, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits") / "shards"
    write_shards(digits_npz, out, shard_size=300)  # 6 shards, the last one short
    return str(out)


def _model() -> SelfLabelNet:
    torch.manual_seed(0)
    m = SelfLabelNet(ModelConfig(arch="small_resnet", widths=[8, 16]), 1, heads=3, clusters=10)
    with torch.no_grad():  # spread the heads' logits so Sinkhorn has real work to do
        for h in m.heads:
            h.weight.mul_(20)
    return m.eval()


def label_pass(rank: int, world: int, shard_dir: str) -> dict:
    from selfclust import collectives as C

    s = ShardSet.open(shard_dir)
    model = _model()
    emb = embed(
        model.backbone,
        eval_batches(s, rank, world, 128),
        torch.device("cpu"),
        None,
        s.num_samples,
        group=WORLD,
    )
    local, stats = sinkhorn_labels(
        model.heads, emb.features, lam=25.0, tol=1e-4, max_iters=2000, group=WORLD
    )
    bank = gather_bank(local, emb.idx, s.num_samples, group=WORLD)
    # k-means++ start and the early stop (not the defaults): the same at any rank count too
    km = kmeans_labels(
        emb, 2, 10, 1000, 0, s.num_samples, seeding="kmeans++", tol=1e-3, group=WORLD
    )
    init = gather_bank(km, emb.idx, s.num_samples, group=WORLD)
    # The loop's call: into the compact int16 bank (sent as bytes: gloo has no int16).
    compact = gather_bank(
        km, emb.idx, s.num_samples, group=WORLD, fill=LabelBank(2, 1797, 10).labels
    )
    assert compact.dtype == torch.int16 and torch.equal(compact.long(), init)
    return {
        "bank": bank,
        "iters": stats.iterations,
        "kmeans": init,
        "n_local": len(emb.idx),
        "world": C.world_size(),
    }


@pytest.mark.parametrize("world", [2, 3])
def test_label_pass_distributed_equals_single(tmp_path: Path, shards: str, world: int) -> None:
    from tests.helpers.spawn import run_ranks

    single = label_pass(0, 1, shards)
    results = run_ranks(label_pass, world, tmp_path, shards)
    assert [r["world"] for r in results] == [world] * world
    assert sum(r["n_local"] for r in results) == 1797
    assert all(0 < r["n_local"] < 1797 for r in results)  # each rank really had its own rows
    for r in results:
        assert torch.equal(r["bank"], results[0]["bank"])  # every rank holds the same bank
        assert torch.equal(r["kmeans"], results[0]["kmeans"])
    agree = (results[0]["bank"] == single["bank"]).float().mean().item()
    assert agree >= 0.999, agree  # float32 sums in another order may flip a rare tie
    assert results[0]["iters"] == pytest.approx(single["iters"], abs=1)
    assert torch.equal(results[0]["kmeans"], single["kmeans"])


def test_label_pass_balanced_and_keyed_by_idx(shards: str) -> None:
    out = label_pass(0, 1, shards)
    assert len(np.unique(out["bank"][0].numpy())) >= 5  # not collapsed into a few clusters
    # permuting the rows the label pass sees must not change any sample's label
    s = ShardSet.open(shards)
    model = _model()
    emb = embed(
        model.backbone, eval_batches(s, 0, 1, 128), torch.device("cpu"), None, 1797, group=WORLD
    )
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(1))
    emb.features, emb.idx = emb.features[perm], emb.idx[perm]
    local, _ = sinkhorn_labels(
        model.heads, emb.features, lam=25.0, tol=1e-4, max_iters=2000, group=WORLD
    )
    assert (gather_bank(local, emb.idx, 1797, group=WORLD) == out["bank"]).float().mean() >= 0.999


def test_recomputed_logits_give_the_stored_labels(shards: str) -> None:
    """``method.sinkhorn_logits=recomputed``: the solver rebuilds each head's logits from the
    features (same chunks as the stored block), so the labels are the same, bit for bit."""
    s = ShardSet.open(shards)
    model = _model()
    emb = embed(
        model.backbone, eval_batches(s, 0, 1, 128), torch.device("cpu"), None, 1797, group=WORLD
    )
    stored, st = sinkhorn_labels(
        model.heads, emb.features, lam=25.0, tol=1e-4, max_iters=2000, group=WORLD
    )
    again, st2 = sinkhorn_labels(
        model.heads, emb.features, lam=25.0, tol=1e-4, max_iters=2000, recompute=True, group=WORLD
    )
    assert torch.equal(again, stored) and st2.iterations == st.iterations


def test_head_logits_and_concat_equal_torch_cat() -> None:
    """The label pass's single-block writes give what a list and ``torch.cat`` gave."""
    from selfclust.labels.label_pass import _concat

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 7)
    f = torch.randn(1000, 16, generator=g)
    w, b = head.weight.detach(), head.bias.detach()
    want = torch.cat([torch.addmm(b, c, w.t()) for c in f.split(300)])
    assert torch.equal(head_logits(head, f, chunk=300), want)
    chunks = list(f.split(333))
    assert torch.equal(_concat(chunks), f) and all(len(c) == 0 for c in chunks)


def logits_modes(rank: int, world: int, free: list[int]) -> list[bool]:
    """``auto``'s rule on each rank with its own free memory, and the fixed modes."""
    from selfclust.labels.sinkhorn_logits import recompute_logits, too_big_to_store

    rows = 100_000 if rank == 0 else 0  # rank 1 holds no rows: the others decide for it
    return [
        too_big_to_store(rows, 3000, free[rank], group=WORLD),
        recompute_logits("auto", rows, 3000, torch.device("cpu"), group=WORLD),
        recompute_logits("recomputed", rows, 3000, torch.device("cpu"), group=WORLD),
        recompute_logits("stored", rows, 3000, torch.device("cpu"), group=WORLD),
    ]


@pytest.mark.parametrize("free_gb,want", [(4.7, True), (4.9, False)])
def test_auto_logits_mode_is_the_same_on_every_rank(tmp_path: Path, free_gb, want) -> None:
    """Two [1e5, 3000] float32 blocks are 2.4 GB: stored while that is at most half the free
    memory of rank 0 (rank 1's is plenty), and every rank decides the same."""
    from tests.helpers.spawn import run_ranks

    free = [int(free_gb * 1e9), 1 << 40]
    got = run_ranks(logits_modes, 2, tmp_path, free)
    assert got == [[want, False, True, False]] * 2


def test_gather_bank_refuses_duplicates() -> None:
    with pytest.raises(RuntimeError, match="exactly once"):
        gather_bank(torch.zeros(1, 3, dtype=torch.long), torch.tensor([0, 1, 1]), 3, group=WORLD)
