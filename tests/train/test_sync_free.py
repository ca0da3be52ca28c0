"""SeLa's training step never waits for the device: no tensor value is read on the host.

On a GPU every such read (``.item()``, ``.cpu()``, ``bool(t)``, a boolean mask, a blocking
copy) makes the host wait for the step's kernels, so it cannot queue the next step while the
GPU runs this one. The CPU test watches every torch call of a real step (a Trainer on one gloo
rank, the default device augmentation, parameters drawn by the loader) for host reads; the GPU
test runs the same step with CUDA's sync checker set to raise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from selfclust.shards.write import write_shards

OVERRIDES = [
    "model.arch=small_resnet",
    "model.widths=[8,16]",
    "method.heads=2",
    "method.clusters=10",
    "method.init=random",
    "optim.batch_size=64",
    "optim.grad_clip=1.0",
    "augment.grayscale=0.5",
    "wandb.mode=disabled",
]
# Tensor methods that hand a value to the host (a sync on a GPU tensor).
HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}


class HostReads(TorchFunctionMode):
    """Records every host read of a tensor value and every boolean-mask index inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        name = getattr(func, "__name__", str(func))
        if name in HOST_READS or name == "nonzero":
            self.reads.append(name)
        elif name == "__getitem__" and _bool_mask(args[1]):
            self.reads.append("boolean mask index")
        return func(*args, **(kwargs or {}))


def _bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def step_reads(rank: int, world: int, shards: str, out: str, device: str) -> list[str]:
    """Host reads of the third training step of a fresh Trainer on ``device`` (the first two
    warm up: optimiser state, cached constants, cuDNN's algorithm search)."""
    from selfclust.config import load_config
    from selfclust.train.context import WorkerContext, configure_process
    from selfclust.train.loop import Trainer

    cfg = load_config(None, [f"data.train={shards}", *OVERRIDES])
    if device != "cpu":
        cfg = load_config(None, [f"data.train={shards}", *OVERRIDES, "trainer.use_gpu=true"])
    ctx = WorkerContext(
        rank=rank,
        world_size=world,
        device=torch.device(device),
        report=lambda metrics, path: None,
        checkpoint_dir=None,
        run_dir=Path(out) / "run",
        wandb_id="test",
    )
    configure_process(cfg)
    trainer = Trainer(cfg, ctx)
    trainer.relabel(initial=True)
    batches = iter(trainer.data.epoch(0, 0))
    for _ in range(2):
        trainer.losses.add(trainer.train_step(*next(batches)))
    batch = next(batches)
    assert len(batch) == 3, "the loader should draw the augmentation parameters"
    if device == "cpu":
        with HostReads() as mode:
            trainer.losses.add(trainer.train_step(*batch))
        return mode.reads
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        trainer.losses.add(trainer.train_step(*batch))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return []


@pytest.fixture(scope="module")
def shards(digits_npz: Path, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits") / "shards"
    write_shards(digits_npz, out, shard_size=500)
    return str(out)


def test_step_reads_nothing_on_the_host(shards: str, tmp_path: Path) -> None:
    from tests.helpers.spawn import run_ranks

    reads = run_ranks(step_reads, 1, tmp_path / "spawn", shards, str(tmp_path), "cpu")[0]
    assert reads == []


def test_host_reads_are_seen(tmp_path: Path) -> None:
    """The watcher itself: it sees the reads the step must not make."""
    x = torch.arange(4.0)
    with HostReads() as mode:
        bool(x.any())
        x[x > 1].sum().item()
        x.cpu()
    assert mode.reads == ["__bool__", "boolean mask index", "item", "cpu"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_has_no_sync(shards: str, tmp_path: Path) -> None:
    from tests.helpers.spawn import run_ranks

    run_ranks(step_reads, 1, tmp_path / "spawn", shards, str(tmp_path), "cuda:0")


def test_loss_window_sums_on_the_device_and_reads_on_the_host() -> None:
    """LossTracker keeps the window's sum where the losses are and hands the host the same
    sum as adding on the host, across a read in mid-window (a checkpoint) and a restore."""
    from selfclust.train.state import LossTracker

    g = torch.Generator().manual_seed(0)
    steps = [torch.rand(3, generator=g) for _ in range(7)]
    tracker = LossTracker(2, ("extra",))
    want = torch.zeros(3)
    for i, losses in enumerate(steps):
        tracker.add(losses)
        want += losses
        if i == 3:  # a checkpoint in mid-window reads the sum, then the window goes on
            saved = tracker.state_dict()
            assert torch.equal(saved["window_loss"], want)
    assert torch.allclose(tracker.window_loss, want, rtol=1e-6)
    restored = LossTracker(2, ("extra",))
    restored.load_state_dict(saved)
    for losses in steps[4:]:
        restored.add(losses)
    assert torch.equal(restored.flush(), tracker.flush()) and tracker.window_n == 0
    assert torch.equal(tracker.window_loss, torch.zeros(3))
