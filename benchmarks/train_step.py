"""Benchmark: selfclust's ``Trainer.train_step`` vs a bare PyTorch loop (same model, batch,
optimizer), and the label pass vs a bare forward pass over the same images, in one run.

    python benchmarks/train_step.py                       # quickstart model, MNIST, CPU
    python benchmarks/train_step.py --arch resnet18 --steps 10
    python benchmarks/train_step.py --gpu --arch resnet18 --batch 256

The bare loop is what anyone would write: ``loss = mean_t CE(head_t(model(x)), y_t)``,
``zero_grad / backward / step`` on a fixed, already augmented batch. ``train_step`` does that
plus selfclust's own work: the augmentation (a function of seed, epoch, idx), the label-bank
lookup by global index and the LR schedule. The table separates the two, so the overhead of
the trainer itself is ``train_step / (bare + augment)``. Steps are timed interleaved
(trainer, bare, augment, trainer, ...) and the median is reported, so load from other
processes hits all columns alike.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from selfclust.config import build_config  # noqa: E402
from selfclust.data.augment import augment, normalize  # noqa: E402
from selfclust.data.streams import eval_batches, train_batches  # noqa: E402
from selfclust.labels.label_pass import random_bank  # noqa: E402
from selfclust.shards.write import write_shards  # noqa: E402
from selfclust.train.context import WorkerContext  # noqa: E402
from selfclust.train.loop import Trainer  # noqa: E402
from selfclust.train.optim import SGD_MOMENTUM


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="small_resnet", help="small_resnet | resnet18 | resnet50")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per column")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (none found)")

    with tempfile.TemporaryDirectory() as tmp:
        write_shards("mnist_test", Path(tmp) / "shards", shard_size=2500)
        model = {"arch": args.arch}
        if args.arch == "small_resnet":
            model["widths"] = [16, 32, 64]  # the quickstart's network
        cfg = build_config(
            {
                "data": {"train": str(Path(tmp) / "shards")},
                "model": model,
                "method": {"heads": args.heads, "clusters": args.clusters},
                "optim": {"batch_size": args.batch},
                "trainer": {"num_workers": 1, "use_gpu": args.gpu},
                "wandb": {"mode": "disabled"},
            }
        )
        ctx = WorkerContext(0, 1, device, lambda m, c: None, None, Path(tmp) / "run", "bench")
        ctx.run_dir.mkdir()
        tr = Trainer(cfg, ctx)
        tr.bank.assign(random_bank(args.heads, tr.n, args.clusters, 0))
        images, idx = next(iter(train_batches(tr.shards, 0, 1, args.batch, 0, 0)))[:2]
        images = images.to(device)

        # The bare loop: its own copy of the same model and optimizer settings.
        bare = copy.deepcopy(tr.model)
        o = cfg.optim
        opt = torch.optim.SGD(
            bare.parameters(), lr=o.lr, momentum=SGD_MOMENTUM, weight_decay=o.weight_decay
        )
        # The bare loop runs in the trainer's numeric format (bf16 autocast and channels_last
        # on a GPU), so that the ratio compares loops, not formats.
        tr.precision.memory_layout_module(bare)
        x = tr.precision.memory_layout(augment(images, idx, cfg.augment, cfg.seed, 0, tr.size))
        y = tr.bank.lookup(idx).to(device)

        def bare_step() -> None:
            with tr.precision.autocast(device):
                out = bare(x)
            loss = torch.stack(
                [F.cross_entropy(z.float(), t) for z, t in zip(out.logits, y, strict=True)]
            ).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def aug() -> None:
            augment(images, idx, cfg.augment, cfg.seed, 0, tr.size)

        cols: dict[str, list[float]] = {"train_step": [], "bare": [], "augment": []}
        fns = {"train_step": lambda: tr.train_step(images, idx), "bare": bare_step, "augment": aug}
        for i in range(args.steps + 3):
            for name, fn in fns.items():
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                if i >= 3:  # warm-up steps not counted
                    cols[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in cols.items()}
        print(
            f"{args.arch}, batch {args.batch}, {args.heads} head(s) × {args.clusters}, {device}, "
            f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}, median of "
            f"{args.steps} steps\n\n| step | ms | × bare |\n|---|---|---|"
        )
        for name, ms in (
            ("bare PyTorch (fwd+bwd+SGD, fixed batch)", med["bare"]),
            ("augment alone", med["augment"]),
            ("bare + augment", med["bare"] + med["augment"]),
            ("selfclust Trainer.train_step", med["train_step"]),
        ):
            print(f"| {name} | {1e3 * ms:.1f} | {ms / med['bare']:.2f} |")
        print(
            f"\ntrain_step / (bare + augment) = "
            f"{med['train_step'] / (med['bare'] + med['augment']):.3f}"
        )

        # Label pass: shards → features → per-head Sinkhorn → bank, vs a bare forward pass
        # over the same images already in memory.
        everything = [b[0] for b in eval_batches(tr.shards, 0, 1, max(256, args.batch))]

        def forward_all() -> None:
            tr.model.eval()
            with torch.no_grad():
                for imgs in everything:
                    tr.model.backbone(normalize(imgs.to(device), tr.size))
            tr.model.train()

        def timed(fn) -> float:  # type: ignore[no-untyped-def]
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            return time.perf_counter() - t

        # Interleaved, best of 2 each: the first pass also pays for allocator warm-up.
        t_fwd, t_embed, t_relabel = math.inf, math.inf, math.inf
        for _ in range(2):
            t_fwd = min(t_fwd, timed(forward_all))
            t_embed = min(
                t_embed, timed(lambda: tr.method.embed(tr.data.label_pass(tr.model), tr.n, False))
            )
            t_relabel = min(t_relabel, timed(tr.relabel))
        print(
            f"\n| label pass over {tr.n} images | s | × bare forward |\n|---|---|---|\n"
            f"| bare forward (backbone, no_grad, images in memory) | {t_fwd:.2f} | 1.00 |\n"
            f"| selfclust embed (read shards, decode, forward) | {t_embed:.2f} | "
            f"{t_embed / t_fwd:.2f} |\n"
            f"| selfclust relabel (embed + Sinkhorn per head + bank) | {t_relabel:.2f} | "
            f"{t_relabel / t_fwd:.2f} |"
        )


if __name__ == "__main__":
    main()
