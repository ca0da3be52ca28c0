"""Probe and k-NN accuracy of a trained run beside two baselines, measured in one run:
raw pixels (no network) and the same architecture with random weights.

    python benchmarks/probe_baselines.py RUN_DIR --data SHARDS [--eval-data SHARDS]
        [--image-size S] [--epochs 30]

Prints one table (top-1; the linear column is the final pool, or the pixels themselves).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from selfclust.data.shardset import ShardSet
from selfclust.eval.evaluate import load_run
from selfclust.eval.probe import ProbeConfig
from selfclust.eval.probe_protocol import probe_model
from selfclust.models.selflabel import SelfLabelNet


class Pixels(nn.Module):
    """The standardised pixels as the only 'stage' (a baseline with no learnt features)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def stage_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pool": x.flatten(1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run")
    p.add_argument("--data", required=True)
    p.add_argument("--eval-data")
    p.add_argument("--image-size", type=int)
    p.add_argument("--epochs", type=int, default=30)
    a = p.parse_args()
    trained, cfg, _, _ = load_run(a.run, a.data)
    torch.manual_seed(0)
    random_net = SelfLabelNet(
        cfg.model, ShardSet.open(a.data).channels, cfg.method.heads, cfg.method.clusters
    )
    data = ShardSet.open(a.data)
    ev = ShardSet.open(a.eval_data) if a.eval_data else None
    size = a.image_size or cfg.data.image_size
    probe_cfg = ProbeConfig(epochs=a.epochs, hflip=cfg.augment.hflip)
    rows = []
    for name, model in (
        ("raw pixels", Pixels()),
        ("random init", random_net),
        ("trained", trained),
    ):
        t0 = time.perf_counter()
        r = probe_model(model, data, ev, probe_cfg, image_size=size, group=None)  # type: ignore[arg-type]
        rows.append(
            (
                name,
                r["linear"]["pool"]["top1"],
                r["knn"]["k20"]["top1"],
                r["knn"]["k200"]["top1"],
                time.perf_counter() - t0,
            )
        )
    print(f"split: {r['split']}  ({r['num_train']} train / {r['num_eval']} eval)")
    print(f"{'features':<12}{'linear':>9}{'k-NN 20':>9}{'k-NN 200':>10}{'seconds':>9}")
    for name, lin, k20, k200, sec in rows:
        print(f"{name:<12}{lin:>9.4f}{k20:>9.4f}{k200:>10.4f}{sec:>9.1f}")


if __name__ == "__main__":
    main()
