"""GPU benchmark: SeLa ResNet-50 training images/s vs supervised ResNet-50 on the same GPU and
data, plus the time of one label pass. Needs one CUDA GPU; exits with a message without one.

    python benchmarks/gpu_train.py                        # CIFAR-10 test JPEGs resized to 224
    python benchmarks/gpu_train.py --synthetic            # generated images (no ../shared)
    python benchmarks/gpu_train.py --data /shared/shards/imagenet-val --batch 128 --compile
    python benchmarks/gpu_train.py --out gpu_train.json   # the numbers as JSON as well

SeLa column: selfclust's own ``Trainer.train_step`` with the ImageNet recipe's model
(ResNet-50, 10 heads × 3000 clusters) and the trainer's GPU path (bf16 autocast, channels_last,
optional torch.compile): batch augmentation on the GPU, label-bank lookup by global index, mean
of the heads' cross-entropies, SGD, LR schedule. Supervised column: what a supervised ImageNet
loop does on the same batches: torchvision ResNet-50 with one 1000-way head, the same GPU
augmentation, bf16 autocast, channels_last, SGD with the same settings, ground-truth targets.
The goal for issue 8 is SeLa >= 0.85 × supervised: the gap is SeLa's ten 2048 × 3000 heads
(61 M parameters, 10× the classifier FLOPs) and the bank lookup.

Batches are decoded once and kept in pinned host memory with their augmentation parameters
(what the training loader's workers draw), so both columns pay the same host-to-device copy
and neither waits for JPEG decoding (loader throughput is benchmarks/data_throughput.py's
job). Timed blocks alternate (SeLa, supervised, SeLa, ...) and the best block of each is
reported. The label pass is ``Trainer.relabel``: read and decode every
shard, backbone forward in float32, then per head the logits and the distributed Sinkhorn-Knopp
(world size 1 here), then the bank update; its embed and Sinkhorn parts are timed apart. Then
the same features embedded under bf16 autocast instead: the share of head 0's Sinkhorn labels
that the rounding changes (the reason label passes embed in float32).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def require_gpu() -> torch.device:
    if not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/gpu_train.py needs a CUDA GPU and found none "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a GPU "
            "machine (driver >= 580 for this CUDA 13 build), e.g. a node of "
            "launch/aws-gpu-spot.yaml or inside docker/Dockerfile.gpu with --gpus all."
        )
    return torch.device("cuda", 0)


if __name__ == "__main__":
    require_gpu()  # before importing selfclust (ray, torchvision: seconds) so no GPU fails fast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from selfclust.collectives import WORLD  # noqa: E402
from selfclust.config import build_config  # noqa: E402
from selfclust.data.augment import augment, draw_params  # noqa: E402
from selfclust.data.streams import train_batches  # noqa: E402
from selfclust.labels.label_pass import random_bank  # noqa: E402
from selfclust.labels.sinkhorn import sinkhorn_labels  # noqa: E402
from selfclust.shards.write import write_shards  # noqa: E402
from selfclust.train.context import WorkerContext  # noqa: E402
from selfclust.train.loop import Trainer  # noqa: E402
from selfclust.train.optim import SGD_MOMENTUM  # noqa: E402

CIFAR_ZIP = (
    Path(__file__).resolve().parents[2] / "shared/data/cifar10_test_jpeg/cifar10_test_jpeg.zip"
)
IMAGENET_TRAIN = 1_281_167


def default_shards(tmp: Path) -> Path:
    """The CIFAR-10 test set's 10,000 real JPEGs (class folders) as shards."""
    if not CIFAR_ZIP.is_file():
        raise SystemExit(f"{CIFAR_ZIP} not found: pass --data SHARD_DIR")
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        z.extractall(tmp / "cifar")
    out = tmp / "shards"
    write_shards(tmp / "cifar" / "test", out, shard_size=2500)
    return out


def synthetic_shards(tmp: Path, n: int = 4096, side: int = 160) -> Path:
    """``n`` generated RGB images (smooth random patterns, ``side`` px) as shards: for a GPU
    machine that has neither ../shared nor a dataset; throughput does not depend on content."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, side // 16, side // 16, generator=g)
    x = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    x = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(tmp / "synthetic.npz", x=x, y=np.arange(n) % 10)
    out = tmp / "shards"
    write_shards(tmp / "synthetic.npz", out, shard_size=1024)
    return out


def timed(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", help="shard dir from `selfclust shard` (default: CIFAR-10 JPEGs)")
    ap.add_argument("--synthetic", action="store_true", help="generated images instead")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128, help="per-GPU batch")
    ap.add_argument("--heads", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=40, help="steps per timed block")
    ap.add_argument("--blocks", type=int, default=3, help="timed blocks per column")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--no-relabel", action="store_true", help="skip the label-pass timing")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    device = require_gpu()
    torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = args.data or str(synthetic_shards(tmp) if args.synthetic else default_shards(tmp))
        cfg = build_config(
            {
                "data": {"train": data, "image_size": args.image_size},
                "model": {"arch": "resnet50", "small_stem": False},
                "method": {"heads": args.heads, "clusters": args.clusters, "init": "random"},
                "optim": {"batch_size": args.batch},
                "trainer": {
                    "num_workers": 1,
                    "use_gpu": True,
                    "cpus_per_worker": 8,
                    "precision": "bf16",
                    "compile": args.compile,
                },
                "wandb": {"mode": "disabled"},
            }
        )
        ctx = WorkerContext(0, 1, device, lambda m, c: None, None, tmp / "run", "bench")
        ctx.run_dir.mkdir()
        tr = Trainer(cfg, ctx)
        if tr.n < args.clusters:
            raise SystemExit(f"{data} has {tr.n} samples, fewer than --clusters {args.clusters}")
        tr.bank.assign(random_bank(args.heads, tr.n, args.clusters, 0))

        # Decoded batches in pinned host memory, with ground truth for the supervised loop.
        need = min(tr.steps_per_epoch, 16)
        batches: list[tuple[torch.Tensor, ...]] = []
        source = _with_cls(tr, args.batch)
        for images, idx, cls in source:
            params = draw_params(cfg.augment, cfg.seed, 0, idx).pin_memory()
            batches.append((images.pin_memory(), idx.pin_memory(), cls, params))
            if len(batches) == need:
                break
        source.close()

        sup = _supervised(cfg, device, args.compile)

        def sela_block() -> None:
            for i in range(args.steps):
                images, idx, _, params = batches[i % len(batches)]
                tr.losses.add(tr.train_step(images, idx, params))  # as Trainer.run does

        def sup_block() -> None:
            for i in range(args.steps):
                images, idx, cls, params = batches[i % len(batches)]
                sup(images, idx, cls, params)

        sela_block()  # warm-up: cudnn autotuning, allocator, compilation
        sup_block()
        times: dict[str, list[float]] = {"sela": [], "supervised": []}
        peak: dict[str, float] = {}
        for _ in range(args.blocks):
            for name, fn in (("sela", sela_block), ("supervised", sup_block)):
                torch.cuda.reset_peak_memory_stats(device)
                times[name].append(timed(fn))
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
        ips = {k: args.steps * args.batch / min(v) for k, v in times.items()}
        ratio = ips["sela"] / ips["supervised"]
        result: dict[str, Any] = {
            "device": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "data": data,
            "image_size": args.image_size,
            "batch": args.batch,
            "heads": args.heads,
            "clusters": args.clusters,
            "compile": args.compile,
            "images_per_s": ips,
            "peak_memory_gib": peak,
            "sela_over_supervised": ratio,
        }
        print(
            f"{result['device']}, torch {torch.__version__}, ResNet-50 at {args.image_size} px, "
            f"batch {args.batch}, bf16 autocast + channels_last"
            f"{' + torch.compile' if args.compile else ''}; best of {args.blocks} blocks of "
            f"{args.steps} steps\n\n| loop | images/s | peak GiB |\n|---|---|---|\n"
            f"| supervised ResNet-50 (1 × 1000-way head) | {ips['supervised']:.0f} | "
            f"{peak['supervised']:.1f} |\n"
            f"| SeLa ResNet-50 ({args.heads} × {args.clusters} heads, Trainer.train_step) | "
            f"{ips['sela']:.0f} | {peak['sela']:.1f} |\n\n"
            f"SeLa / supervised = {ratio:.3f} (goal >= 0.85)"
        )

        if not args.no_relabel:
            t_embed, t_relabel = math.inf, math.inf
            for _ in range(2):  # best of two: the first also pays for warm-up
                t_embed = min(t_embed, timed(lambda: embed_features(tr)))
                t_relabel = min(t_relabel, timed(tr.relabel))
            t_sk = max(0.0, t_relabel - t_embed)
            per_image = t_relabel / tr.n
            result["relabel"] = {
                "samples": tr.n,
                "seconds": t_relabel,
                "embed_seconds": t_embed,
                "sinkhorn_and_bank_seconds": t_sk,
                "images_per_s": tr.n / t_relabel,
            }
            print(
                f"\n| label pass over {tr.n} images ({args.heads} heads × {args.clusters}) "
                f"| s | images/s |\n|---|---|---|\n"
                f"| embed (read shards, decode, resize, ResNet-50 forward in float32) | "
                f"{t_embed:.2f} | {tr.n / t_embed:.0f} |\n"
                f"| Sinkhorn per head + bank update | {t_sk:.2f} | |\n"
                f"| whole relabel | {t_relabel:.2f} | {tr.n / t_relabel:.0f} |\n\n"
                f"Linear extrapolation (an estimate, not a measurement): one ImageNet label "
                f"pass ≈ {per_image * IMAGENET_TRAIN / 60:.1f} GPU-minutes, i.e. "
                f"{per_image * IMAGENET_TRAIN / 60 / 8:.1f} min on 8 GPUs."
            )
            result["bf16_label_change"] = change = bf16_label_change(tr)
            print(
                f"\nbf16 autocast instead of float32 in the label pass changes "
                f"{100 * change:.2f} % of head 0's Sinkhorn labels (same model, same images)"
            )
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))


def embed_features(tr: Trainer) -> torch.Tensor:
    """The label pass's features (float32, as Trainer.relabel embeds them)."""
    return tr.method.embed(tr.data.label_pass(tr.model), tr.n, False).features


def bf16_label_change(tr: Trainer) -> float:
    """Share of head 0's Sinkhorn labels that differ when the label pass embeds under bf16
    autocast rather than in float32 (the features in the same sample order both times)."""
    m = tr.cfg.method

    def labels(bf16: bool) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            emb = tr.method.embed(tr.data.label_pass(tr.model), tr.n, False)
        order = emb.idx.argsort()
        feats = emb.features.float()[order.to(emb.features.device)]
        got, _ = sinkhorn_labels(tr.model.heads[:1], feats, m.lam, 1e-3, 1000, group=WORLD)
        return got[0].cpu()

    return float((labels(True) != labels(False)).float().mean())


def _with_cls(tr: Trainer, batch: int):  # type: ignore[no-untyped-def]
    """Training batches (idx order of the real epoch) with each sample's ground-truth class."""
    from selfclust.data.streams import eval_batches

    cls = torch.full((tr.n,), -1, dtype=torch.int64)
    for _, idx, c in eval_batches(tr.shards, 0, 1, 1024, image_size=8):
        cls[idx] = c
    for images, idx in train_batches(
        tr.shards, 0, 1, batch, 0, 0, num_workers=0, image_size=tr.size
    ):  # in-process: the loop stops early, and no worker may outlive it
        yield images, idx, cls[idx].clamp(min=0)


def _supervised(cfg: Any, device: torch.device, compile_model: bool):  # type: ignore[no-untyped-def]
    """One supervised training step: torchvision ResNet-50, 1000 classes, same GPU path."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50(num_classes=1000).to(device).to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_model else model
    o = cfg.optim
    opt = torch.optim.SGD(
        model.parameters(), lr=o.lr, momentum=SGD_MOMENTUM, weight_decay=o.weight_decay
    )

    def step(images: torch.Tensor, idx: torch.Tensor, cls: torch.Tensor, p: torch.Tensor) -> None:
        x = augment(images.to(device, non_blocking=True), idx, cfg.augment, cfg.seed, 0,
                    cfg.data.image_size, params=p)  # fmt: skip
        x = x.contiguous(memory_format=torch.channels_last)
        y = cls.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


if __name__ == "__main__":
    main()
