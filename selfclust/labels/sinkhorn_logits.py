"""Logits as Sinkhorn reads them: a stored [n, K] tensor, or :class:`LinearLogits`, a linear
head's logits recomputed in row chunks whenever :mod:`selfclust.labels.sinkhorn` reads them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import torch
from torch import nn

from selfclust import collectives as C

# LinearLogits: default rows per recomputed chunk, as bytes of float32 logits.
_RECOMPUTE_BYTES = 64 << 20


def head_logits(head: nn.Module, features: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """[n, D] features → [n, K] float32 logits of one head, computed in row chunks (a linear
    head by one addmm per chunk; any other head, e.g. DEC's Student-t layer, by calling it)."""
    if not isinstance(head, nn.Linear):
        with torch.no_grad():
            return torch.cat([head(f.float()).float() for f in features.split(chunk)])
    linear = cast(nn.Linear, head)
    w, b = linear.weight.detach().float(), linear.bias.detach().float()
    # Written chunk by chunk into one block: a list of chunks and their cat would hold two.
    out = features.new_empty((len(features), w.shape[0]), dtype=torch.float32)
    for at, f in zip(range(0, len(features), chunk), features.split(chunk), strict=True):
        torch.addmm(b, f, w.t(), out=out[at : at + len(f)])
    return out


def recompute_logits(
    mode: str, rows: int, clusters: int, device: torch.device, group: C.Group
) -> bool:
    """``method.sinkhorn_logits``: whether each head's logits are recomputed (True) rather
    than stored. ``auto`` stores them (two ``[rows, K]`` float32 blocks at the solver's peak,
    logits and kernel) when that takes at most half of the device's free memory on every rank
    of ``group``, and recomputes them (one block) otherwise; on the CPU it stores them.
    Collective over ``group`` for ``auto`` on CUDA (every rank decides the same)."""
    if mode != "auto":
        return mode == "recomputed"
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return too_big_to_store(rows, clusters, free, group)


def too_big_to_store(rows: int, clusters: int, free_bytes: int, group: C.Group) -> bool:
    """``auto``'s rule (collective): two float32 ``[rows, clusters]`` blocks over half of
    ``free_bytes`` on any rank."""
    need = torch.tensor([int(2 * rows * clusters * 4 > free_bytes // 2)], dtype=torch.int64)
    return bool(C.all_reduce_max(need, group)[0])


class LinearLogits:
    """A linear head's logits ``features @ weight.T + bias``, never held whole: Sinkhorn
    recomputes them in row chunks (one ``addmm`` each) whenever it reads the logits (the
    checks, each kernel rebuild and exact column step), so its peak memory is the features
    plus one ``[n, K]`` float32 block (the kernel) and one chunk (``chunk`` rows, by default
    ~64 MiB of logits) instead of two blocks. Worth it where a matrix product is cheap next to
    the memory, i.e. on GPUs; on a CPU each rebuild then costs a product of ``n × D × K``.
    The result equals solving on the stored logits up to the order of float32 column sums.
    """

    def __init__(
        self,
        features: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        chunk: int | None = None,
    ) -> None:
        if features.dim() != 2 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
            raise ValueError(
                f"features [n, D] and weight [K, D] must agree, got {tuple(features.shape)} "
                f"and {tuple(weight.shape)}"
            )
        k = weight.shape[0]
        self.features = features
        self.weight = weight.detach().float()
        self.bias = (torch.zeros(k) if bias is None else bias.detach()).float().to(weight.device)
        self.chunk = max(1, chunk or _RECOMPUTE_BYTES // (4 * k))
        self.shape = torch.Size((features.shape[0], k))
        self.device = features.device
        self.dtype = torch.float32  # of the recomputed blocks

    def dim(self) -> int:
        return 2

    def is_floating_point(self) -> bool:
        return True

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, logits of those rows) for consecutive row chunks, float32, contiguous."""
        w_t = self.weight.t()
        for start in range(0, self.shape[0], self.chunk):
            f = self.features[start : start + self.chunk]
            yield slice(start, start + f.shape[0]), torch.addmm(self.bias, f.float(), w_t)


def _blocks(logits: torch.Tensor | LinearLogits) -> Iterator[tuple[slice, torch.Tensor]]:
    """The logits as (rows, block) pairs: a stored tensor is one block."""
    if isinstance(logits, LinearLogits):
        yield from logits.blocks()
    else:
        yield slice(0, logits.shape[0]), logits
