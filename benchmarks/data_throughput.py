"""Images/s of read + decode + augment: selfclust's reader vs webdataset's own pipeline and
torchvision's ImageFolder, each with a DataLoader.

Both read the same JPEGs (the CIFAR-10 test set, and 224-px upscaled copies) with the same
number of loader workers and batch size, and end with the augmented, standardised float batch
[B, 3, s, s] that the model would take, with SeLa's augmentations (RandomResizedCrop scale
0.2-1, horizontal flip, colour jitter 0.4/0.4/0.4 with p=0.8, grayscale p=0.2):

* ``imagefolder``: ``ImageFolder`` + torchvision transforms v2 per sample in the workers;
* ``shards/device``: selfclust's default; workers decode, the batch is augmented at once
  (here on the CPU in the main process; on a GPU in training);
* ``webdataset``: the same shard files through ``wds.WebDataset`` (shard shuffle, split by
  worker, a 2000-sample shuffle buffer as ``data.shuffle_buffer``) + ``DataLoader``, with the
  same decode (:func:`selfclust.data.reader.decode`) and the same batch augmentation as
  ``shards/device``: the ratio between the two is the cost of selfclust's reader (global
  index, equal steps per rank, bad-data accounting);
* ``shards/loader``: ``augment.where=loader``; workers decode, crop and jitter
  (:class:`selfclust.data.augment.LoaderAugment`), the main process standardises.

Each case runs one shuffled epoch ``--repeats`` times, interleaved, from worker start to the
last batch; the table shows the median and the ratio to ImageFolder.

    python benchmarks/data_throughput.py --workers 2 --batch 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from selfclust.config import AugmentConfig
from selfclust.data.augment import augment, normalize
from selfclust.data.collate import Decoder
from selfclust.data.shardset import ShardSet
from selfclust.data.streams import train_batches
from selfclust.shards.write import write_shards

ZIP = Path(__file__).parents[2] / "shared" / "data" / "cifar10_test_jpeg" / "cifar10_test_jpeg.zip"
CFG = AugmentConfig()  # SeLa's: crop scale 0.2-1, flip 0.5, jitter 0.4 (p 0.8), grayscale 0.2


def prepare(work: Path, n224: int) -> dict[str, tuple[Path, Path, int]]:
    """Image folders (32 px originals; 224 px upscaled JPEGs) and their shards, made once."""
    out = {}
    folder = work / "cifar32"
    if not folder.exists():
        with zipfile.ZipFile(ZIP) as z:
            z.extractall(work / "unzip")
        (work / "unzip" / "test").rename(folder)
    big = work / "cifar224"
    if not big.exists():
        files = sorted(folder.rglob("*.jpg"))
        step = max(1, len(files) // n224)
        for p in files[::step][:n224]:
            dst = big / p.parent.name / p.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(p) as im:
                im.resize((224, 224), Image.Resampling.BICUBIC).save(dst, quality=90)
    for name, tree, size in [("32 px", folder, 32), ("224 px", big, 224)]:
        shards = work / f"{tree.name}_shards"
        if not shards.exists():
            write_shards(tree, shards, shard_size=500, workers=2)  # JPEG bytes kept as they are
        out[name] = (tree, shards, size)
    return out


def imagefolder(tree: Path, size: int, workers: int, batch: int) -> Iterable[torch.Tensor]:
    tf = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=CFG.crop_scale, ratio=CFG.crop_ratio),
            v2.RandomHorizontalFlip(CFG.hflip),
            v2.RandomApply([v2.ColorJitter(CFG.jitter, CFG.jitter, CFG.jitter)], p=CFG.jitter_p),
            v2.RandomGrayscale(CFG.grayscale),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.25] * 3),
        ]
    )
    ds = datasets.ImageFolder(str(tree), transform=tf)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    return (x for x, _ in loader)


def shards_device(shards: ShardSet, size: int, workers: int, batch: int) -> Iterable[torch.Tensor]:
    it = train_batches(shards, 0, 1, batch, 0, 0, num_workers=workers, image_size=size)
    return (augment(images, idx, CFG, 0, 0, size) for images, idx in it)


def webdataset_pipeline(
    shards: ShardSet, size: int, workers: int, batch: int
) -> Iterable[torch.Tensor]:
    import webdataset as wds

    decoder = Decoder(shards.channels, size, None)
    ds = (
        wds.WebDataset(shards.urls, shardshuffle=len(shards.urls), empty_check=False)
        .shuffle(2000)
        .map(decoder.one)
        .select(lambda item: item is not None)
        .batched(batch, collation_fn=decoder.batch, partial=False)
    )
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return (augment(images, idx, CFG, 0, 0, size) for images, idx, _ in loader)


def shards_loader(shards: ShardSet, size: int, workers: int, batch: int) -> Iterable[torch.Tensor]:
    it = train_batches(
        shards, 0, 1, batch, 0, 0, num_workers=workers, image_size=size, loader_augment=CFG
    )
    return (normalize(images) for images, _ in it)


def rate(make: Callable[[], Iterable[torch.Tensor]]) -> float:
    """Images/s over one epoch, from creating the loader to the last batch."""
    start, n = time.perf_counter(), 0
    for x in make():
        assert x.dtype == torch.float32 and x.ndim == 4
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/selfclust_data_bench"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n224", type=int, default=3000, help="224-px images (of 10,000)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    ap.add_argument("--out", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    sets = prepare(args.work, args.n224)
    results = []
    w, b = args.workers, args.batch
    for name, (tree, shard_dir, size) in sets.items():
        shards = ShardSet.open(shard_dir)
        cases: dict[str, Callable[[], Iterable[torch.Tensor]]] = {
            "imagefolder": lambda t=tree, s=size: imagefolder(t, s, w, b),
            "shards/device": lambda d=shards, s=size: shards_device(d, s, w, b),
            "webdataset": lambda d=shards, s=size: webdataset_pipeline(d, s, w, b),
            "shards/loader": lambda d=shards, s=size: shards_loader(d, s, w, b),
        }
        rates: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeats):  # interleaved, so background load hits all cases alike
            for k, make in cases.items():
                rates[k].append(rate(make))
        med = {k: statistics.median(v) for k, v in rates.items()}
        results.append({"set": name, "images": shards.num_samples, "median": med, "all": rates})
    print(
        f"\nloader workers {args.workers}, batch {args.batch}, main-process torch threads "
        f"{args.threads}, median of {args.repeats} epochs (images/s)\n"
    )
    print(
        "| images | ImageFolder + v2 | webdataset + DataLoader | selfclust, device aug. "
        "| ÷ webdataset | ÷ ImageFolder | selfclust, loader aug. | ÷ ImageFolder |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        m = r["median"]
        base, wds_rate, dev = m["imagefolder"], m["webdataset"], m["shards/device"]
        print(
            f"| {r['images']} × {r['set']} | {base:.0f} | {wds_rate:.0f} | {dev:.0f} | "
            f"{dev / wds_rate:.2f}× | {dev / base:.2f}× | {m['shards/loader']:.0f} | "
            f"{m['shards/loader'] / base:.2f}× |"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
