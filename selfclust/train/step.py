"""One optimisation step, whatever the method: backward, gradient sync, clip, step.

Also the numeric format of the forward pass (:class:`Precision`): bf16 autocast and the
channels_last memory format on CUDA, plain fp32 on the CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from selfclust import collectives as C
from selfclust.config import TrainerConfig
from selfclust.train.gpu import native_bf16


@dataclass(frozen=True)
class Precision:
    autocast_dtype: torch.dtype | None  # None: fp32
    memory_format: torch.memory_format | None  # None: as loaded

    @classmethod
    def for_device(cls, t: TrainerConfig, device: torch.device) -> Precision:
        """``trainer.precision`` (auto: bf16 on a GPU that runs it natively, compute
        capability >= 8.0, else fp32: :func:`selfclust.train.gpu.resolve_precision`, whose
        preflight logs the fallback); channels_last on CUDA, where bf16 convolutions run
        faster in it (ignored on CPU)."""
        cuda = device.type == "cuda"
        bf16 = t.precision == "bf16" or (t.precision == "auto" and cuda and native_bf16(device))
        return cls(
            autocast_dtype=torch.bfloat16 if bf16 else None,
            memory_format=torch.channels_last if cuda else None,
        )

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        return torch.autocast(
            device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    def memory_layout_module(self, model: nn.Module) -> None:
        """Convert ``model``'s parameters to the memory format, in place."""
        if self.memory_format is not None:
            model.to(memory_format=self.memory_format)  # type: ignore[call-overload]

    def memory_layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory_format is None:
            return x
        return x.contiguous(memory_format=self.memory_format)


def ddp_forward(
    model: nn.Module, precision: Precision, device: torch.device, world_size: int, compile: bool
) -> nn.Module:
    """The module a DDP method's step calls: the model in the precision's memory format
    (converted in place), wrapped in DistributedDataParallel over several ranks and, on CUDA
    when asked, in torch.compile."""
    precision.memory_layout_module(model)
    forward: nn.Module = model
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        # Buffers are not broadcast each step: rank 0's BatchNorm statistics reach every rank
        # before each label pass and evaluation (sync_buffers), and the checkpoint is rank 0's.
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True
        )
    if device.type == "cuda" and compile:
        forward = torch.compile(forward)  # type: ignore[assignment]
    return forward


def average_gradients(model: nn.Module, world_size: int) -> None:
    """Mean gradient over ranks in one flat all-reduce (what DDP does in buckets).

    Parameters a phase does not use (the decoder while DEC clusters) have no gradient on any
    rank, so every rank sends the same list; the optimiser then leaves them alone.
    """
    if world_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = C.all_reduce_sum(torch.cat([g.flatten() for g in grads]))
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def optimizer_step(
    model: nn.Module,
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    grad_clip: float | None,
    sync: bool,
    world_size: int,
) -> None:
    """Backward, then (``sync``: when DDP does not) the gradient mean over ranks, clip, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sync:
        average_gradients(model, world_size)
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
