"""Thin wrappers over torch.distributed that are no-ops at world size 1.

Every collective in selfclust goes through this module, so algorithms take a ``group``
(:data:`Group`) and never test ``dist.is_initialized()`` themselves. ``group=None`` means "no
group": the call runs on this process alone, even when a default process group exists. Pass
:data:`WORLD` to use the default group (a no-op too while none is initialised), or a
``dist.ProcessGroup`` (from ``dist.new_group``) for a subgroup.
"""

from __future__ import annotations

import enum
from typing import Final, TypeAlias

import torch
import torch.distributed as dist


class _World(enum.Enum):
    """The type of :data:`WORLD`: "the default process group" (``dist.group.WORLD``), kept
    distinct from None (no group) and named before any group exists."""

    WORLD = "world"


WORLD: Final = _World.WORLD
# What every collective takes: a process group, the default one (WORLD), or none.
Group: TypeAlias = dist.ProcessGroup | _World | None

__all__ = [
    "WORLD",
    "Group",
    "rank",
    "world_size",
    "all_reduce_sum",
    "all_reduce_max",
    "all_gather_cat",
    "broadcast",
]


def _resolve(group: Group) -> dist.ProcessGroup | None:
    if group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist.group.WORLD if group is WORLD else group


def rank(group: Group = WORLD) -> int:
    g = _resolve(group)
    return 0 if g is None else dist.get_rank(g)


def world_size(group: Group = WORLD) -> int:
    g = _resolve(group)
    return 1 if g is None else dist.get_world_size(g)


def all_reduce_sum(t: torch.Tensor, group: Group = WORLD) -> torch.Tensor:
    """Sum ``t`` over the group in place and return it."""
    g = _resolve(group)
    if g is not None and dist.get_world_size(g) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)
    return t


def all_reduce_max(t: torch.Tensor, group: Group = WORLD) -> torch.Tensor:
    g = _resolve(group)
    if g is not None and dist.get_world_size(g) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g)
    return t


def all_gather_cat(t: torch.Tensor, group: Group = WORLD) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of every rank, in rank order.

    Ranks may hold different numbers of rows: sizes are exchanged first and the rows padded
    to the largest, so one call moves max_rows × world_size rows.
    """
    g = _resolve(group)
    if g is None or dist.get_world_size(g) == 1:
        return t
    ws = dist.get_world_size(g)
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n, group=g)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(ws)]
    dist.all_gather(parts, padded.contiguous(), group=g)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)], dim=0)


def broadcast(t: torch.Tensor, src: int = 0, group: Group = WORLD) -> torch.Tensor:
    """Broadcast ``t`` from group rank ``src`` in place and return it."""
    g = _resolve(group)
    if g is not None and dist.get_world_size(g) > 1:
        dist.broadcast(t, src=dist.get_global_rank(g, src), group=g)
    return t
