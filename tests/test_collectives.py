"""selfclust.collectives on 1, 2 and 3 gloo ranks (one rank holding no rows) against the
single-process result on the concatenated data; no-ops with no process group; ``group=None``
stays local even when a default group exists; a subgroup with ``src`` ≠ 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfclust import collectives as C
from tests.helpers.spawn import run_ranks

# Rows per rank: one rank holds none (the first at 2 ranks, the middle one at 3).
COUNTS = {1: [4], 2: [0, 4], 3: [3, 0, 5]}


def rows(rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s rows of the global [N, 2, 3] float64 tensor whose entries are 0..6N-1."""
    lo = sum(COUNTS[world][:rank])
    n = COUNTS[world][rank]
    return torch.arange(6 * lo, 6 * (lo + n), dtype=torch.float64).reshape(n, 2, 3)


def everything(world: int) -> torch.Tensor:
    return torch.cat([rows(r, world) for r in range(world)])


def collect(rank: int, world: int) -> dict:
    import torch.distributed as dist

    out: dict = {"rank": C.rank(), "world": C.world_size()}
    out["rank_none"], out["world_none"] = C.rank(None), C.world_size(None)
    x = rows(rank, world)
    out["gather"] = C.all_gather_cat(x)
    out["gather_is_input"] = out["gather"] is x
    ids = torch.arange(len(x), dtype=torch.int64) + 100 * rank  # [n_r] int64, 1-D
    out["gather_ids"] = C.all_gather_cat(ids)
    out["gather_all_empty"] = C.all_gather_cat(torch.zeros(0, 3, dtype=torch.int32))
    out["gather_none"] = C.all_gather_cat(x, group=None)  # this process alone

    s = torch.tensor([float(rank + 1), x.sum().item()], dtype=torch.float64)
    out["sum_in_place"] = C.all_reduce_sum(s) is s
    out["sum"] = s
    m = torch.tensor([rank, -rank, len(x)], dtype=torch.int64)
    out["max_in_place"] = C.all_reduce_max(m) is m
    out["max"] = m
    local = torch.tensor([float(rank + 1)])
    C.all_reduce_sum(local, group=None)
    C.all_reduce_max(local, group=None)
    out["reduce_none"] = local
    b = torch.full((2,), float(rank))
    out["bcast_in_place"] = C.broadcast(b, src=world - 1) is b
    out["bcast"] = b
    out["bcast_none"] = C.broadcast(torch.full((2,), float(rank)), src=0, group=None)

    # Subgroup of the ranks after 0 (every rank must create it; only members use it).
    members = list(range(1, world))
    sub = dist.new_group(members) if members else None
    if rank in members:
        out["sub_rank"], out["sub_world"] = C.rank(sub), C.world_size(sub)
        out["sub_gather"] = C.all_gather_cat(x, group=sub)
        out["sub_sum"] = C.all_reduce_sum(torch.tensor([float(rank)]), group=sub)
        # src is a rank *in the group*: group rank len(members) - 1 is global rank world - 1
        top = len(members) - 1
        out["sub_bcast"] = C.broadcast(torch.full((1,), float(rank)), src=top, group=sub)
    return out


def test_no_process_group_means_no_ops() -> None:
    """Without a process group every call returns its input untouched (world size 1)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    assert C.rank() == 0 and C.world_size() == 1
    x = torch.arange(6.0).reshape(3, 2)
    for group in (C.WORLD, None):
        assert C.all_gather_cat(x, group) is x
        assert C.all_reduce_sum(x, group) is x and C.all_reduce_max(x, group) is x
        assert C.broadcast(x, 0, group) is x
    torch.testing.assert_close(x, torch.arange(6.0).reshape(3, 2), rtol=0, atol=0)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_collectives_equal_single_process(world: int, tmp_path: Path) -> None:
    results = run_ranks(collect, world, tmp_path)
    want = everything(world)  # the single-process oracle: all rows in rank order
    ids = torch.cat([torch.arange(c) + 100 * r for r, c in enumerate(COUNTS[world])])
    total = torch.tensor([world * (world + 1) / 2, want.sum().item()], dtype=torch.float64)
    for rank, out in enumerate(results):
        assert (out["rank"], out["world"]) == (rank, world)
        assert (out["rank_none"], out["world_none"]) == (0, 1)
        assert out["gather"].dtype == torch.float64 and out["gather"].shape == want.shape
        assert torch.equal(out["gather"], want), rank
        assert out["gather_is_input"] == (world == 1)  # world size 1: the input itself
        assert out["gather_ids"].dtype == torch.int64 and torch.equal(out["gather_ids"], ids)
        assert out["gather_all_empty"].shape == (0, 3)
        assert out["gather_all_empty"].dtype == torch.int32
        assert torch.equal(out["gather_none"], rows(rank, world))  # local rows only
        assert out["sum_in_place"] and out["max_in_place"] and out["bcast_in_place"]
        assert torch.equal(out["sum"], total)
        assert torch.equal(out["max"], torch.tensor([world - 1, 0, max(COUNTS[world])]))
        assert torch.equal(out["reduce_none"], torch.tensor([float(rank + 1)]))
        assert torch.equal(out["bcast"], torch.full((2,), float(world - 1)))
        assert torch.equal(out["bcast_none"], torch.full((2,), float(rank)))
        if rank == 0:
            assert "sub_rank" not in out
            continue
        members = list(range(1, world))
        assert (out["sub_rank"], out["sub_world"]) == (rank - 1, len(members))
        assert torch.equal(out["sub_gather"], torch.cat([rows(r, world) for r in members]))
        assert torch.equal(out["sub_sum"], torch.tensor([float(sum(members))]))
        assert torch.equal(out["sub_bcast"], torch.full((1,), float(world - 1)))
