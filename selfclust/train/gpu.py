"""The GPUs a run trains on, checked before training starts (``trainer.use_gpu``).

Each failure is a :class:`GpuError` (a :class:`~selfclust.errors.UserError`): one line naming
the fix, raised at once instead of spending Ray Train's restarts on a machine that cannot run
torch's CUDA build.

* :func:`check_cluster_gpus`: the local Ray cluster selfclust starts has a GPU per worker
  (otherwise Ray would wait for the missing ones and retry forever);
* :func:`check_worker_gpu`: on each worker, that CUDA works, that torch has kernels for this
  GPU, and which precision ``trainer.precision`` gives here (``auto``: bf16 only where the GPU
  runs it natively, compute capability >= 8.0; fp32 otherwise, said in one log line).

The decisions are pure functions of :class:`GpuFacts` (unit-tested on the CPU);
:func:`read_facts` is the thin part that asks torch and the driver.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from selfclust.errors import UserError

if TYPE_CHECKING:
    import torch

    from selfclust.config import TrainerConfig

log = logging.getLogger("selfclust.gpu")

# CUDA major version of a torch build -> the oldest NVIDIA driver that runs it (CUDA's minor
# version compatibility floor: 580 for CUDA 13, 525 for 12, 450 for 11).
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
NO_GPU_FIX = "or set trainer.use_gpu=false"
PROC_VERSION = "/proc/driver/nvidia/version"  # the kernel module's version, without NVML


class GpuError(UserError, RuntimeError):
    """The GPUs cannot run this run as configured (driver, GPU model, count, precision)."""


@dataclass(frozen=True)
class GpuFacts:
    """What a worker knows of its GPU; everything after ``driver`` only when CUDA works."""

    cuda_available: bool
    torch_version: str  # torch.__version__, e.g. "2.14.1+cu130"
    torch_cuda: str | None  # torch.version.cuda, e.g. "13.0"; None for a CPU-only build
    driver: str | None  # the NVIDIA driver's version, e.g. "570.86.15"; None where unknown
    name: str = ""  # the GPU's name, e.g. "NVIDIA L40S"
    capability: tuple[int, int] = (0, 0)  # compute capability (major, minor)
    arch_list: tuple[str, ...] = ()  # torch.cuda.get_arch_list(): "sm_80", "compute_90", ...
    native_bf16: bool = False  # torch.cuda.is_bf16_supported(including_emulation=False)

    @property
    def gpu(self) -> str:
        major, minor = self.capability
        return f"GPU {self.name or '?'} (compute capability {major}.{minor})"


def arch_covers(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``arch`` runs on a GPU of ``capability``.

    ``sm_XY``: machine code, which runs on X.Y and later minors of the same major (X.Z, Z >= Y);
    ``sm_XYa``: architecture-specific, X.Y only; ``compute_XY``: PTX, which the driver compiles
    for any GPU of capability >= X.Y.
    """
    m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch)
    if m is None:
        return False
    kind, major, minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if kind == "compute":
        return capability >= (major, minor)
    if suffix == "a":
        return capability == (major, minor)
    return capability[0] == major and capability[1] >= minor


def _required_driver(torch_cuda: str | None) -> int | None:
    if not torch_cuda:
        return None
    return MIN_DRIVER.get(int(torch_cuda.split(".")[0]))


def _driver_major(driver: str | None) -> int | None:
    m = re.match(r"(\d+)", driver or "")
    return int(m.group(1)) if m else None


def check_cuda(f: GpuFacts) -> None:
    """Raise :class:`GpuError` where CUDA does not work on this worker, saying why if known."""
    if f.cuda_available:
        return
    if f.torch_cuda is None:
        raise GpuError(
            f"trainer.use_gpu=true but torch {f.torch_version} is a CPU-only build: install "
            f"PyPI's CUDA build (pip install torch=={f.torch_version.split('+')[0]}), "
            f"{NO_GPU_FIX}"
        )
    need = _required_driver(f.torch_cuda)
    have = _driver_major(f.driver)
    build = f"torch {f.torch_version} is built for CUDA {f.torch_cuda}"
    newer = f"install an NVIDIA driver >= {need}" if need else "install a newer NVIDIA driver"
    if have is not None and need is not None and have < need:
        raise GpuError(
            f"trainer.use_gpu=true but CUDA is not available on this worker: NVIDIA driver "
            f"{f.driver} is too old ({build}, which needs a driver >= {need}): {newer}, "
            f"{NO_GPU_FIX}"
        )
    driver = f"NVIDIA driver {f.driver}" if f.driver else "no NVIDIA driver found"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    raise GpuError(
        f"trainer.use_gpu=true but CUDA is not available on this worker ({driver}{seen}; "
        f"{build}): check that `nvidia-smi` sees the GPU ({newer} if it is older), "
        f"{NO_GPU_FIX}"
    )


def check_capability(f: GpuFacts) -> None:
    """Raise :class:`GpuError` where torch has no kernels for this GPU (e.g. a V100, 7.0,
    with torch's CUDA 13 build, whose oldest is sm_75)."""
    if not f.arch_list or any(arch_covers(a, f.capability) for a in f.arch_list):
        return
    major, minor = f.capability
    raise GpuError(
        f"{f.gpu} is not supported by torch {f.torch_version}, which has kernels for "
        f"{' '.join(f.arch_list)} only (this GPU would fail with 'no kernel image is "
        f"available'): run on a GPU that list covers, install a torch build for "
        f"sm_{major}{minor}, {NO_GPU_FIX}"
    )


def resolve_precision(
    precision: Literal["auto", "bf16", "fp32"], f: GpuFacts
) -> tuple[Literal["bf16", "fp32"], str | None]:
    """The autocast dtype ``trainer.precision`` gives on this GPU, and a note to log when
    ``auto`` falls back to fp32. An explicit ``bf16`` without native support is an error:
    torch would emulate it, many times slower than fp32."""
    if precision == "fp32":
        return "fp32", None
    if f.native_bf16:
        return "bf16", None
    if precision == "bf16":
        raise GpuError(
            f"trainer.precision=bf16 but {f.gpu} has no native bf16 (compute capability "
            f">= 8.0; torch would emulate it, slowly): set trainer.precision=auto (fp32 on "
            f"this GPU) or trainer.precision=fp32"
        )
    return "fp32", f"{f.gpu} has no native bf16: trainer.precision=auto trains in fp32"


def check_gpu(f: GpuFacts, precision: Literal["auto", "bf16", "fp32"]) -> str | None:
    """All of a worker's checks; returns the note to log, if any (see :func:`resolve_precision`)."""
    check_cuda(f)
    check_capability(f)
    return resolve_precision(precision, f)[1]


def check_cluster_gpus(t: TrainerConfig, gpus: float, local: bool) -> None:
    """Raise :class:`GpuError` where a ``local`` cluster (one selfclust started: no autoscaler
    will add nodes) has fewer GPUs than ``trainer.num_workers`` with ``trainer.use_gpu``.
    Ray Train would wait for the missing ones, time out every minute and retry without end."""
    if not (local and t.use_gpu) or gpus >= t.num_workers:
        return
    have = int(gpus)
    fix = (
        "set trainer.use_gpu=false"
        if have == 0
        else f"set trainer.num_workers={have} (one worker per GPU), or trainer.use_gpu=false"
    )
    raise GpuError(
        f"trainer.use_gpu=true with trainer.num_workers={t.num_workers} needs "
        f"{_gpus(t.num_workers)}, but the local Ray cluster has {_gpus(have)}: {fix}, or "
        f"join a cluster with enough GPUs with ray.address"
    )


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def driver_version() -> str | None:
    """The NVIDIA driver's version: NVML (nvidia-ml-py, the ``gpu`` extra) or the kernel
    module's ``/proc/driver/nvidia/version``; None where neither tells."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no nvidia-ml-py, or no driver for NVML to load: try the kernel module
        pass
    try:
        with open(PROC_VERSION) as fh:
            return proc_driver_version(fh.read())
    except OSError:
        return None


def proc_driver_version(text: str) -> str | None:
    """The version in ``/proc/driver/nvidia/version``'s text ("NVRM version: NVIDIA UNIX
    x86_64 Kernel Module  535.104.05 ...", or "... Open Kernel Module for x86_64  580.95.05
    ..."), None if it holds none."""
    m = re.search(r"Kernel Module.*?\b(\d+\.\d+(?:\.\d+)*)", text)
    return m.group(1) if m else None


def read_facts(device: torch.device) -> GpuFacts:
    """:class:`GpuFacts` of ``device`` (a CUDA device), from torch and the driver."""
    import torch

    version, cuda = torch.__version__, torch.version.cuda
    if not torch.cuda.is_available():
        return GpuFacts(False, version, cuda, driver_version())
    with torch.cuda.device(device):  # is_bf16_supported asks the current device
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    return GpuFacts(
        True,
        version,
        cuda,
        driver_version(),
        name=torch.cuda.get_device_name(device),
        capability=torch.cuda.get_device_capability(device),
        arch_list=tuple(torch.cuda.get_arch_list()),
        native_bf16=native,
    )


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 natively (a CUDA GPU of compute capability >= 8.0)."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def check_worker_gpu(t: TrainerConfig, device: torch.device, rank: int) -> None:
    """A worker's preflight with ``trainer.use_gpu`` (nothing otherwise): raises
    :class:`GpuError`, or logs (rank 0) that ``precision: auto`` trains in fp32 here."""
    if not t.use_gpu:
        return
    note = check_gpu(read_facts(device), t.precision)
    if note and rank == 0:
        log.warning("[selfclust] %s", note)
