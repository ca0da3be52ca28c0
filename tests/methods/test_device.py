"""Device placement of DEC, DEPICT and DGG, checked without a GPU.

The model goes to a second device with real values (:mod:`tests.methods.other_device`:
``meta`` tensors that carry CPU data, so that any op mixing the model's device with a CPU
tensor raises as it would on CUDA) while images, indices, the label bank and the k-means /
UMAP pools stay on the CPU, as in a GPU run. Each method runs what the trainer calls: a
pretraining step, the label pass and first labels (k-means, fitted head, GMM, k-NN graph), a
clustering step with its backward, a refresh (DEPICT: also its manifold refresh), and a
restore from the state dict. Also checked there: a clustering step reads nothing back to the
host (targets' K-vectors go to the device and are validated once per refresh).

The ``gpu`` tests run the same sequence on a real CUDA device.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import numpy as np
import pytest
import torch
from torch import nn

from selfclust import collectives as C
from selfclust.config import load_config
from selfclust.labels.bank import LabelBank
from selfclust.labels.label_pass import gather_bank
from selfclust.methods.nets import build_cluster_net
from selfclust.methods.registry import build_runner
from selfclust.methods.runner import MethodRunner, fit_head
from tests.helpers.data import digits
from tests.methods.other_device import META, DeviceMismatch, OtherDevice, Remote

pytestmark = pytest.mark.usefixtures("one_thread")

N, K, BATCH = 300, 5, 100
FIT = "method.head_fit_steps=5"
SMALL = {
    "dec": ["method.hidden=[32,32]"],
    "depict": ["method.conv_channels=[8,8]", "method.manifold_neighbors=10", FIT],
    "dgg": ["method.hidden=[32,32]", "method.knn_k=5", FIT],
}
METHODS = list(SMALL)
# cluster_init=manifold: UMAP + GMM on the pool, centroids from every rank's rows
MANIFOLD_INIT = ["method.cluster_init=manifold", "method.manifold_neighbors=10"]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The first N sklearn digits as the loader gives them: uint8 [B, 1, 8, 8], CPU."""
    x, y = digits()
    images = torch.from_numpy((x[:N].astype(np.int64) * 255 // 16).astype(np.uint8))[:, None]
    idx, cls = torch.arange(N), torch.from_numpy(y[:N])
    return [(images[i : i + BATCH], idx[i : i + BATCH], cls[i : i + BATCH]) for i in
            range(0, N, BATCH)]  # fmt: skip


def _loader() -> Any:
    """A label pass's batches (the loader's ``Batches`` without its bad-data counts)."""
    return iter(_batches())


def _runner(name: str, device: torch.device, extra: list[str] | None = None) -> MethodRunner:
    cfg = load_config(None, ["data.train=unused", f"method.name={name}", f"method.clusters={K}",
                             "method.kmeans_restarts=2", *SMALL[name], *(extra or [])])  # fmt: skip
    model = build_cluster_net(cfg, 1, 8).to(device)  # as the trainer: the model, then its method
    return build_runner(cfg, model, N, device=device)


def _relabel(r: MethodRunner, bank: LabelBank, step: int, manifold: bool = False) -> None:
    """A label pass and update as :meth:`selfclust.train.loop.Trainer.relabel` makes it."""
    emb = r.embed(_loader(), N, initial=step == 0)
    assert emb.features.device == r.device and emb.idx.device.type == "cpu"
    if step == 0:
        local, _ = r.first_labels(emb, bank)
    else:
        local, record = r.update_labels(emb, bank, step, manifold)
        assert record.get("labeller") == ("manifold" if manifold else None)
    assert local.device.type == "cpu" and local.shape == (1, N), local  # the bank's labels
    bank.assign(gather_bank(local, emb.idx, N, group=C.WORLD, fill=bank.labels))


def _step(r: MethodRunner, bank: LabelBank, phase: str, step: int) -> None:
    images, idx, _ = _batches()[step % 3]
    loss, logged = r.batch_losses(images, idx, phase=phase, epoch=0, step=step, bank=bank)
    assert loss.device == logged.device == r.device  # the loop sums them on the device
    assert logged.shape == (1 + len(r.terms),)
    loss.backward()


def drive(
    name: str, device: torch.device, mode: OtherDevice | None = None, extra: list[str] | None = None
) -> dict[str, int]:
    """Every stage of a run of ``name`` with its model on ``device``; returns the host
    syncs (``mode.syncs``) of each clustering step."""
    syncs: dict[str, int] = {}

    def cluster_step(label: str, step: int) -> None:
        before = mode.syncs if mode else 0
        _step(r, bank, "cluster", step)
        syncs[label] = (mode.syncs if mode else 0) - before

    r = _runner(name, device, extra)
    bank = LabelBank(1, N, K)
    _step(r, bank, "pretrain", 0)
    _relabel(r, bank, 0)  # k-means, fitted head / GMM / k-NN graph, the first targets
    cluster_step("after first labels", 1)
    _relabel(r, bank, 2)
    cluster_step("after a refresh", 3)
    if name == "depict":
        _relabel(r, bank, 4, manifold=True)  # UMAP + GMM targets matched to the head
        cluster_step("after the manifold refresh", 5)
    state = r.state_dict()
    assert all(t.device.type == "cpu" for t in _tensors(state)), "checkpoints hold CPU tensors"
    resumed = build_runner(r.cfg, r.model, N, device=device)
    with warnings.catch_warnings():  # loading CPU values into meta parameters does not copy
        warnings.filterwarnings("ignore", ".*copying from a non-meta parameter")
        resumed.load_state_dict(state)
    if resumed.needs_resume_pass:
        resumed.rebuild(_loader(), N)
    r = resumed
    cluster_step("after a restore", 6)
    return syncs


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    return []


# ---------------------------------------------------------------- the emulated device itself
def test_other_device_rejects_what_cuda_rejects() -> None:
    """Mixing is refused where the dispatcher refuses it (on meta as on CUDA), and allowed
    where CUDA allows it: CPU scalars in elementwise ops, CPU indices, copies across."""
    with OtherDevice() as mode:
        head = nn.Linear(3, 2).to(META)
        x = torch.ones(4, 3)
        with pytest.raises(DeviceMismatch, match="expected device"):
            head(x)
        out = head(x.to(META))
        w, b = cast(Remote, head.weight).value, cast(Remote, head.bias).value
        assert out.device == META
        assert torch.equal(cast(Remote, out).value, nn.functional.linear(x, w, b))
        with pytest.raises(DeviceMismatch):
            torch.stack([out.sum(), torch.zeros(())])  # review A2's failure
        with pytest.raises(DeviceMismatch):
            torch.bincount(torch.zeros(3, dtype=torch.int64), torch.ones(3).to(META))
        assert (out * torch.tensor(2.0)).device == META  # a CPU scalar is allowed
        assert out[torch.tensor([0, 2])].device == META  # so are CPU indices
        back = out.sum().cpu()
        assert back.device.type == "cpu" and mode.syncs == 0
        float(out.detach().sum())
        assert mode.syncs == 1  # .item() of a device value: a host sync


# ---------------------------------------------------------------- the methods
def test_fit_head_trains_on_the_heads_device() -> None:
    """Review A1: the pool and labels are CPU tensors (``sample_pool``); the head is not."""
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(40, 3, generator=g)
    labels = (pool[:, 0] > 0).long()
    centroids = torch.stack([pool[labels == c].mean(0) for c in (0, 1)])
    with OtherDevice():
        head = nn.Linear(3, 2).to(META)
        ce = fit_head(head, pool, labels, 5, centroids, group=C.WORLD)
        assert head.weight.device == META
    assert 0 <= ce < 0.7


@pytest.mark.parametrize(
    ("name", "extra"), [(m, []) for m in METHODS] + [("dgg", MANIFOLD_INIT)], ids=[*METHODS,
    "dgg-manifold-init"]
)  # fmt: skip
def test_clustering_runs_on_the_models_device(name: str, extra: list[str]) -> None:
    """Review A1–A3: every stage of the method with its model on another device than the
    data, the pools and the bank; a clustering step reads nothing back to the host (B6)."""
    with OtherDevice() as mode:
        syncs = drive(name, META, mode, extra)
    assert syncs and not any(syncs.values()), syncs


@pytest.mark.parametrize("name", ["dec", "depict"])
def test_target_vectors_are_checked_when_set(name: str) -> None:
    """DEC's f and DEPICT's column sums are validated where they are set (a refresh or a
    restore), not at every step."""
    r = _runner(name, torch.device("cpu"))
    state = r.state_dict()
    key = "f" if name == "dec" else "s"
    state[key] = torch.zeros_like(state[key])
    with pytest.raises(ValueError, match="positive"):
        r.load_state_dict(state)


# ---------------------------------------------------------------- the GPU settings
@pytest.mark.parametrize("name", METHODS)
def test_compile_and_bf16_are_refused(name: str) -> None:
    """Review B7: torch.compile and the bf16 autocast wrap SeLa's forward only; these methods
    train uncompiled in fp32, so a config asking otherwise is an error naming the key."""
    from selfclust.config import ConfigError

    for key in ("trainer.compile=true", "trainer.precision=bf16"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            load_config(None, ["data.train=unused", f"method.name={name}", key])
    cfg = load_config(None, ["data.train=unused", f"method.name={name}", "trainer.precision=fp32"])
    assert not cfg.trainer.compile and cfg.trainer.precision == "fp32"


# ---------------------------------------------------------------- on a real GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("name", "extra"), [(m, []) for m in METHODS] + [("dgg", MANIFOLD_INIT)], ids=[*METHODS,
    "dgg-manifold-init"]
)  # fmt: skip
def test_clustering_runs_on_cuda(name: str, extra: list[str]) -> None:
    drive(name, torch.device("cuda"), extra=extra)
