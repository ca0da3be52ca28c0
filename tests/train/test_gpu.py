"""The GPU preflight (selfclust.train.gpu): every decision on the facts a worker would read,
on the CPU; what torch reports here (no CUDA) gives the CUDA error."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from selfclust.config import build_config
from selfclust.errors import UserError
from selfclust.train import gpu
from selfclust.train.gpu import (
    GpuError,
    GpuFacts,
    arch_covers,
    check_capability,
    check_cluster_gpus,
    check_cuda,
    check_gpu,
    check_worker_gpu,
    proc_driver_version,
    resolve_precision,
)
from selfclust.train.step import Precision

# torch 2.14.1+cu130's own list (what torch.cuda.get_arch_list() returns on this wheel)
CU130 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")


def facts(name: str, capability: tuple[int, int], **kw) -> GpuFacts:
    base = GpuFacts(True, "2.14.1+cu130", "13.0", "580.95.05", name, capability, CU130)
    return dataclasses.replace(base, native_bf16=capability >= (8, 0), **kw)


H100 = facts("NVIDIA H100 80GB HBM3", (9, 0))
T4 = facts("Tesla T4", (7, 5))
V100 = facts("Tesla V100-SXM2-16GB", (7, 0))


def trainer(**kw):
    return build_config({"trainer": kw}).trainer


def test_the_wheels_arch_list_is_the_one_tested_here() -> None:
    if torch.version.cuda and torch.version.cuda.startswith("13."):
        assert tuple(torch.cuda.get_arch_list()) == CU130


@pytest.mark.parametrize(
    ("arch", "capability", "runs"),
    [
        ("sm_80", (8, 0), True),
        ("sm_80", (8, 6), True),  # machine code runs on later minors of its major (A10, L40S)
        ("sm_80", (8, 9), True),
        ("sm_86", (8, 0), False),  # ... never on earlier ones
        ("sm_80", (9, 0), False),  # ... nor on another major
        ("sm_100", (10, 0), True),
        ("sm_100", (10, 3), True),
        ("sm_120", (12, 1), True),
        ("sm_100", (12, 0), False),
        ("sm_90a", (9, 0), True),  # architecture-specific: that one GPU only
        ("sm_90a", (9, 1), False),
        ("sm_100f", (10, 3), True),  # family: the later minors too
        ("compute_90", (12, 0), True),  # PTX: the driver compiles it for any later GPU
        ("compute_90", (8, 9), False),
        ("gfx90a", (9, 0), False),
    ],
)
def test_arch_covers(arch: str, capability: tuple[int, int], runs: bool) -> None:
    assert arch_covers(arch, capability) is runs


@pytest.mark.parametrize("gpu_", [T4, H100, facts("NVIDIA L40S", (8, 9)), facts("B200", (10, 0))])
def test_gpus_the_wheel_covers_pass(gpu_: GpuFacts) -> None:
    check_capability(gpu_)
    check_cuda(gpu_)


def test_a_gpu_the_wheel_does_not_cover_is_named_with_the_list() -> None:
    with pytest.raises(GpuError) as e:
        check_gpu(V100, "auto")
    msg = str(e.value)
    assert "GPU Tesla V100-SXM2-16GB (compute capability 7.0)" in msg
    assert "torch 2.14.1+cu130" in msg and "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120" in msg
    assert "torch build for sm_70" in msg and msg.endswith("or set trainer.use_gpu=false")
    assert isinstance(e.value, UserError)  # ends the run at once, never retried by Ray


def test_an_empty_arch_list_is_not_judged() -> None:
    check_capability(dataclasses.replace(V100, arch_list=()))


def test_no_cuda_with_an_old_driver_names_the_driver_and_the_fix() -> None:
    old = GpuFacts(False, "2.14.1+cu130", "13.0", "535.104.05")
    with pytest.raises(GpuError) as e:
        check_gpu(old, "auto")
    assert str(e.value) == (
        "trainer.use_gpu=true but CUDA is not available on this worker: NVIDIA driver "
        "535.104.05 is too old (torch 2.14.1+cu130 is built for CUDA 13.0, which needs a "
        "driver >= 580): install an NVIDIA driver >= 580, or set trainer.use_gpu=false"
    )


def test_no_cuda_without_a_driver(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(GpuError) as e:
        check_cuda(GpuFacts(False, "2.14.1+cu130", "13.0", None))
    msg = str(e.value)
    assert "(no NVIDIA driver found, CUDA_VISIBLE_DEVICES='0'; torch 2.14.1+cu130 is built " in msg
    assert "`nvidia-smi`" in msg and "driver >= 580" in msg and "trainer.use_gpu=false" in msg


def test_no_cuda_with_a_recent_driver_does_not_blame_the_driver(monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(GpuError) as e:
        check_cuda(GpuFacts(False, "2.14.1+cu130", "13.0", "580.95.05"))
    assert "too old" not in str(e.value) and "(NVIDIA driver 580.95.05; torch" in str(e.value)


def test_a_cpu_only_torch() -> None:
    with pytest.raises(GpuError, match=r"torch 2.14.1\+cpu is a CPU-only build: install PyPI's"):
        check_cuda(GpuFacts(False, "2.14.1+cpu", None, None))


def test_precision() -> None:
    assert resolve_precision("auto", H100) == ("bf16", None)
    assert resolve_precision("bf16", H100) == ("bf16", None)
    assert resolve_precision("fp32", T4) == ("fp32", None)
    assert resolve_precision("auto", T4) == (
        "fp32",
        "GPU Tesla T4 (compute capability 7.5) has no native bf16: trainer.precision=auto "
        "trains in fp32",
    )
    assert check_gpu(T4, "auto") == resolve_precision("auto", T4)[1]


def test_explicit_bf16_without_native_bf16_is_an_error() -> None:
    with pytest.raises(GpuError) as e:
        check_gpu(T4, "bf16")
    assert str(e.value) == (
        "trainer.precision=bf16 but GPU Tesla T4 (compute capability 7.5) has no native "
        "bf16 (compute capability >= 8.0; torch would emulate it, slowly): set "
        "trainer.precision=auto (fp32 on this GPU) or trainer.precision=fp32"
    )


def test_the_fallback_is_one_line_on_rank_0(monkeypatch, caplog) -> None:
    monkeypatch.setattr(gpu, "read_facts", lambda device: T4)
    t = trainer(use_gpu=True)
    with caplog.at_level(logging.WARNING, logger="selfclust.gpu"):
        for rank in range(4):
            check_worker_gpu(t, torch.device("cuda", rank), rank)
    assert [r.getMessage() for r in caplog.records] == [
        "[selfclust] GPU Tesla T4 (compute capability 7.5) has no native bf16: "
        "trainer.precision=auto trains in fp32"
    ]


def test_worker_check_reads_this_machine(monkeypatch) -> None:
    check_worker_gpu(trainer(use_gpu=False), torch.device("cpu"), 0)  # nothing to check
    if not torch.cuda.is_available():
        with pytest.raises(GpuError, match="CUDA is not available on this worker"):
            check_worker_gpu(trainer(use_gpu=True), torch.device("cuda", 0), 0)


@pytest.mark.parametrize(
    ("native", "precision", "dtype"),
    [(True, "auto", torch.bfloat16), (False, "auto", None), (True, "fp32", None)],
)
def test_precision_on_cuda_follows_native_bf16(monkeypatch, native, precision, dtype) -> None:
    monkeypatch.setattr("selfclust.train.step.native_bf16", lambda device: native)
    p = Precision.for_device(trainer(precision=precision), torch.device("cuda", 0))
    assert p.autocast_dtype == dtype and p.memory_format == torch.channels_last
    cpu = Precision.for_device(trainer(precision="auto"), torch.device("cpu"))
    assert cpu.autocast_dtype is None and cpu.memory_format is None


def test_too_few_gpus_on_a_local_cluster() -> None:
    with pytest.raises(GpuError) as e:
        check_cluster_gpus(trainer(use_gpu=True, num_workers=1), 0, local=True)
    assert str(e.value) == (
        "trainer.use_gpu=true with trainer.num_workers=1 needs 1 GPU, but the local Ray "
        "cluster has 0 GPUs: set trainer.use_gpu=false, or join a cluster with enough GPUs "
        "with ray.address"
    )
    with pytest.raises(GpuError) as e:
        check_cluster_gpus(trainer(use_gpu=True, num_workers=8), 4.0, local=True)
    assert "needs 8 GPUs, but the local Ray cluster has 4 GPUs: set trainer.num_workers=4" in str(
        e.value
    )


def test_enough_gpus_or_not_ours_to_judge() -> None:
    check_cluster_gpus(trainer(use_gpu=True, num_workers=4), 4.0, local=True)
    check_cluster_gpus(trainer(use_gpu=True, num_workers=4), 0, local=False)  # an autoscaler
    check_cluster_gpus(trainer(use_gpu=False, num_workers=4), 0, local=True)


def test_driver_version_from_the_kernel_module() -> None:
    text = (
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  "
        "(dvs-builder@U16-I3-B03-4-3)  Tue Sep 23 09:26:11 UTC 2025\nGCC version:  gcc 12.3.0\n"
    )
    assert proc_driver_version(text) == "580.95.05"
    old = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC"
    assert proc_driver_version(old) == "535.104.05"
    assert proc_driver_version("") is None
