"""``selfclust probe``: where the probes of :mod:`probe` run — on how many ranks, on which device.

``--workers auto`` (the default) follows the run: its ``trainer.num_workers`` ranks when the
feature set is large (more than :data:`AUTO_MIN_SAMPLES` samples), else one process. Ranks are
local processes (``torch.multiprocessing`` spawn, file rendezvous), each on ``cuda:<rank>``
when CUDA exists (gloo for the CPU collectives, nccl for CUDA tensors, as the trainer), else on
the CPU. Ray is not involved: the probe is a one-shot job whose result comes straight back.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from selfclust import collectives as C
from selfclust.config import RunConfig
from selfclust.data.shardset import ShardSet
from selfclust.eval.probe import ProbeConfig
from selfclust.eval.probe_protocol import probe_model

AUTO_MIN_SAMPLES = 50_000
"""``--workers auto`` uses the run's ``trainer.num_workers`` ranks only when more samples than
this are to be embedded (``--data`` plus ``--eval-data``); below it one process finishes in
well under a minute (10,000 digits: 10-20 s on 2 CPU cores) and starting ranks would not pay."""


def resolve_workers(
    workers: int | str, run_cfg: RunConfig, num_samples: int, num_shards: int, gpus: int
) -> tuple[int, str]:
    """Ranks for ``selfclust probe`` and the reason, as recorded in the output.

    ``"auto"``: the run's ``trainer.num_workers`` above :data:`AUTO_MIN_SAMPLES` samples, else
    1; capped at the shards of the training data (a rank without shards would embed nothing)
    and at the visible GPUs (one rank per GPU). An explicit count is used as given.
    """
    if workers != "auto":
        if isinstance(workers, str) or workers < 1:
            raise ValueError(f"--workers takes 'auto' or a count >= 1, got {workers!r}")
        if gpus and workers > gpus:
            raise ValueError(
                f"--workers {workers} needs one GPU per rank but {gpus} are visible: use "
                f"--workers {gpus} (or CUDA_VISIBLE_DEVICES= for CPU ranks)"
            )
        return workers, f"--workers {workers}"
    if num_samples <= AUTO_MIN_SAMPLES:
        return 1, f"auto: {num_samples:,} samples <= {AUTO_MIN_SAMPLES:,}, one process"
    n = run_cfg.trainer.num_workers
    caps = [(num_shards, "training shards")] + ([(gpus, "visible GPUs")] if gpus else [])
    capped = [f"{c} {what}" for c, what in caps if c < n]
    world = min([n, *(c for c, _ in caps)])
    rule = (
        f"auto: {num_samples:,} samples > {AUTO_MIN_SAMPLES:,}, the run's trainer.num_workers={n}"
    )
    return world, rule + (f", capped at {' and '.join(capped)}" if capped else "")


def _device(local_rank: int) -> torch.device:
    """``cuda:<local rank>`` when CUDA exists (the backbone forward runs there), else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _rank_main(rank: int, world: int, rendezvous: str, kwargs: dict[str, Any]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = _device(rank)  # local ranks: rank == local rank
    # As the trainer: CPU tensors (every collective here) over gloo, CUDA ones over nccl.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world
    )
    try:
        result = _probe_here(**kwargs, device=device)
        if rank == 0:
            Path(rendezvous + ".result").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _run_config(target: str | Path) -> RunConfig:
    """The run's resolved config, from its final checkpoint (or the checkpoint dir given)."""
    from selfclust.checkpoint import read_state
    from selfclust.rundir import resolve_checkpoint

    return RunConfig.model_validate(read_state(resolve_checkpoint(Path(target)))["config"])


def _probe_here(
    target: str,
    data: str | None,
    eval_data: str | None,
    cfg: ProbeConfig,
    image_size: int | None,
    workers: dict[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    from selfclust.eval.evaluate import load_run

    model, run_cfg, ckpt, _ = load_run(target, data)
    if cfg.hflip is None:
        cfg = replace(cfg, hflip=run_cfg.augment.hflip)
    train = ShardSet.open(data or run_cfg.data.train, run_cfg.data.io_timeout_s)
    ev = ShardSet.open(eval_data, run_cfg.data.io_timeout_s) if eval_data else None
    size = image_size or run_cfg.data.image_size
    result = probe_model(
        model.to(device), train, ev, cfg, image_size=size, device=device, group=C.WORLD
    )
    result.update(checkpoint=str(Path(ckpt).resolve()), data=train.root, image_size=size)
    result["eval_data"] = ev.root if ev else None
    result["world_size"] = C.world_size()
    result["workers"] = workers
    result["device"] = device.type
    return result


def run_probe(
    target: str | Path,
    data: str | None,
    eval_data: str | None,
    cfg: ProbeConfig,
    *,
    workers: int | str = "auto",
    image_size: int | None = None,
) -> dict[str, Any]:
    """``selfclust probe``: probes and k-NN for a run dir or checkpoint dir, on
    :func:`resolve_workers` local ranks (spawned when more than one), each embedding its own
    shards on ``cuda:<rank>`` when CUDA exists, else on the CPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    run_cfg = _run_config(target)
    io = run_cfg.data.io_timeout_s
    train = ShardSet.open(data or run_cfg.data.train, io)
    n = train.num_samples + (ShardSet.open(eval_data, io).num_samples if eval_data else 0)
    world, rule = resolve_workers(workers, run_cfg, n, len(train.urls), gpus)
    kwargs = dict(
        target=str(target),
        data=data,
        eval_data=eval_data,
        cfg=cfg,
        image_size=image_size,
        workers={"requested": workers, "ranks": world, "rule": rule},
    )
    if world == 1:
        return _probe_here(**kwargs, device=_device(0))  # type: ignore[arg-type]
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="selfclust-probe-") as tmp:
        rendezvous = str(Path(tmp) / "rendezvous")
        # A rank that fails makes start_processes end the others and raise: none waits forever.
        mp.start_processes(
            _rank_main, args=(world, rendezvous, kwargs), nprocs=world, start_method="spawn"
        )
        return json.loads(Path(rendezvous + ".result").read_text())
