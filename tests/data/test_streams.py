"""Shard reading: deterministic assignment, equal step counts on every rank, exact coverage."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from selfclust.data.plan import assign_shards, steps_per_epoch
from selfclust.data.shardset import ShardSet
from selfclust.data.streams import eval_batches, train_batches
from selfclust.shards.write import write_shards
from tests.helpers.data import MNIST, digits

B = 32


def load_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def reshard(src: Path, dst: Path, sizes: list[int]) -> Path:
    """Rewrite a shard directory with the given shard sizes (e.g. one shard much larger)."""
    m = json.loads((src / "manifest.json").read_text())
    samples = [
        s for sh in m["shards"] for s in wds.tarfile_samples([{"url": str(src / sh["name"])}])
    ]
    assert sum(sizes) == len(samples)
    dst.mkdir()
    shards, first = [], 0
    for k, n in enumerate(sizes):
        name = f"shard-{k:06d}.tar"
        with open(dst / name, "wb") as f, wds.TarWriter(f) as w:
            for s in samples[first : first + n]:
                w.write({key: v for key, v in s.items() if key != "__url__"})
        sha = hashlib.sha256((dst / name).read_bytes()).hexdigest()
        shards.append({"name": name, "count": n, "sha256": sha, "first_idx": first})
        first += n
    (dst / "manifest.json").write_text(json.dumps({**m, "shards": shards}))
    return dst


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, ShardSet]:
    """digits (1797 samples) as 18 shards of 100 (short last), as one shard much larger than
    the rest, and as a single shard (fewer shards than ranks)."""
    root = tmp_path_factory.mktemp("sets")
    x, y = digits()
    np.savez(root / "digits.npz", x=x, y=y)
    write_shards(root / "digits.npz", root / "even", shard_size=100)
    write_shards(root / "digits.npz", root / "single", shard_size=5000)
    reshard(root / "even", root / "skewed", [1200, 100, 100, 100, 100, 100, 97])
    return {name: ShardSet.open(str(root / name)) for name in ["even", "skewed", "single"]}


def idx_list(batches) -> list[int]:
    return [i for b in batches for i in b[1].tolist()]


def test_shardset_open(sets) -> None:
    s = sets["even"]
    assert s.num_samples == 1797 and len(s.urls) == 18 and s.counts[-1] == 97
    assert s.image == {"height": 8, "width": 8, "channels": 1} and s.channels == 1
    assert s.classes is None and Path(s.urls[0]).is_file()
    assert sets["skewed"].counts == [1200, 100, 100, 100, 100, 100, 97]


@pytest.mark.parametrize(
    "counts", [[100] * 17 + [97], [1200, 100, 100, 100, 100, 100, 97], [5, 300, 7, 80, 1, 64]]
)
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_assign_shards(counts, world_size) -> None:
    fixed = assign_shards(counts, world_size, seed=0, epoch=None)
    assert fixed == assign_shards(counts, world_size, seed=7, epoch=None)  # seed unused
    assert sorted(i for r in fixed for i in r) == list(range(len(counts)))
    per_epoch = [assign_shards(counts, world_size, seed=3, epoch=e) for e in range(4)]
    assert per_epoch[1] == assign_shards(counts, world_size, seed=3, epoch=1)
    if world_size < len(counts):
        assert len({str(a) for a in per_epoch}) > 1
        assert per_epoch[1] != assign_shards(counts, world_size, seed=4, epoch=1)
    for a in [fixed, *per_epoch]:
        assert len(a) == world_size
        assert sorted(i for r in a for i in r) == list(range(len(counts)))
        loads = [sum(counts[i] for i in r) for r in a]
        assert max(loads) - min(loads) <= max(counts)  # greedy: within one shard


def test_steps_per_epoch() -> None:
    assert steps_per_epoch(1797, 3, 32) == 18
    with pytest.raises(ValueError, match="too small for batch_size × world_size.*lower the batch"):
        steps_per_epoch(1797, 2, 1000)


GRID = (
    [("even", w, n) for w in (1, 2, 3) for n in (0, 1, 2)]
    + [("skewed", w, n) for w in (2, 3) for n in (0, 2)]
    + [("single", w, n) for w in (2, 3) for n in (0, 2)]
)


@pytest.mark.parametrize("name,world_size,num_workers", GRID)
def test_equal_steps_and_exact_eval_coverage(sets, name, world_size, num_workers) -> None:
    shards = sets[name]
    x, y = digits()
    steps = steps_per_epoch(1797, world_size, B)
    for rank in range(world_size):
        batches = list(train_batches(shards, rank, world_size, B, 0, 1, num_workers=num_workers))
        assert len(batches) == steps
        for images, idx in batches:
            assert images.dtype == torch.uint8 and images.shape == (B, 1, 8, 8)
            assert idx.dtype == torch.int64 and idx.shape == (B,)
            np.testing.assert_array_equal(images[:, 0].numpy(), x[idx.numpy()])

    seen = []
    for rank in range(world_size):
        batches = list(eval_batches(shards, rank, world_size, B, num_workers=num_workers))
        assert all(len(b[1]) == B for b in batches[:-1]) and 0 < len(batches[-1][1]) <= B
        for images, idx, cls in batches:
            np.testing.assert_array_equal(images[:, 0].numpy(), x[idx.numpy()])
            np.testing.assert_array_equal(cls.numpy(), y[idx.numpy()])
        seen += idx_list(batches)
    assert sorted(seen) == list(range(1797))


def test_train_order_is_deterministic_and_changes_per_epoch(sets) -> None:
    shards = sets["even"]

    def order(epoch, rank=0, seed=0, workers=2):
        return idx_list(train_batches(shards, rank, 2, B, seed, epoch, num_workers=workers))

    first = order(1)
    assert first == order(1)
    assert first != order(2) and first != order(1, seed=1)
    assert set(first).isdisjoint(order(1, rank=1))  # ranks never share a shard
    assert first != sorted(first)  # shuffled within the rank
    # A batch comes from one loader worker, so a worker may refill up to one batch.
    assert len(first) - len(set(first)) <= B
    in_process = order(1, workers=0)
    assert len(set(in_process)) == len(in_process) == 28 * B

    single = idx_list(train_batches(shards, 0, 1, B, 0, 0))  # world size 1: all distinct
    assert len(single) == 56 * B and len(set(single)) == len(single)


def test_short_rank_cycles_long_rank_drops(sets) -> None:
    shards = sets["skewed"]
    steps = steps_per_epoch(1797, 2, B)
    assignment = assign_shards(shards.counts, 2, seed=0, epoch=3)
    loads = [sum(shards.counts[i] for i in r) for r in assignment]
    short, long = int(np.argmin(loads)), int(np.argmax(loads))
    assert loads[short] < steps * B < loads[long]

    got = Counter(idx_list(train_batches(shards, short, 2, B, 0, 3)))
    assert sum(got.values()) == steps * B
    mine = {
        i
        for s in assignment[short]
        for i in range(sum(shards.counts[:s]), sum(shards.counts[: s + 1]))
    }
    assert set(got) == mine  # every own sample, some twice
    got = Counter(idx_list(train_batches(shards, long, 2, B, 0, 3)))
    assert sum(got.values()) == steps * B and max(got.values()) == 1


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("name,num_workers", [("even", 0), ("skewed", 2), ("skewed", 3)])
def test_skip_steps_yields_the_tail(sets, name, num_workers) -> None:
    shards = sets[name]
    args = dict(rank=0, world_size=1, batch_size=B, seed=5, epoch=2, num_workers=num_workers)
    full = list(train_batches(shards, **args))
    steps = len(full)
    for skip in [1, 5, steps - 1, steps]:
        tail = list(train_batches(shards, **args, skip_steps=skip))
        assert len(tail) == steps - skip
        for (a, i), (b, j) in zip(full[skip:], tail, strict=True):
            assert torch.equal(i, j) and torch.equal(a, b)
    with pytest.raises(ValueError, match="skip_steps"):
        train_batches(shards, **args, skip_steps=steps + 1)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_loader_draws_the_device_augmentation_parameters(sets) -> None:
    """``device_augment``: each batch carries its ``draw_params`` (drawn by the loader
    workers, so the training step does not), and the images and order do not change."""
    from selfclust.config import AugmentConfig
    from selfclust.data.augment import draw_params

    aug = AugmentConfig()
    args = dict(rank=1, world_size=2, batch_size=B, seed=5, epoch=3, num_workers=2)
    plain = list(train_batches(sets["skewed"], **args))
    drawn = list(train_batches(sets["skewed"], **args, device_augment=aug, skip_steps=1))
    assert len(drawn) == len(plain) - 1
    for (a, i), (b, j, p) in zip(plain[1:], drawn, strict=True):
        assert torch.equal(a, b) and torch.equal(i, j)
        assert p.dtype == torch.float32 and torch.equal(p, draw_params(aug, 5, 3, j))
    with pytest.raises(ValueError, match="not both"):
        train_batches(sets["even"], 0, 1, B, 0, 0, loader_augment=aug, device_augment=aug)


def test_argument_errors(sets) -> None:
    with pytest.raises(ValueError, match="rank"):
        train_batches(sets["even"], 2, 2, B, 0, 0)
    with pytest.raises(ValueError, match="too small"):
        train_batches(sets["even"], 0, 2, 1000, 0, 0)
    with pytest.raises(ValueError, match="rank"):
        eval_batches(sets["even"], -1, 2, B)


def test_mnist_eval_resize_and_labels(tmp_path) -> None:
    write_shards("mnist_test", tmp_path / "m", shard_size=6000)
    shards = ShardSet.open(str(tmp_path / "m"))
    y = load_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    x = load_idx(MNIST / "t10k-images-idx3-ubyte.gz")
    idx, cls = [], []
    for images, i, c in eval_batches(shards, 0, 1, 500):
        assert images.shape == (len(i), 1, 28, 28)
        np.testing.assert_array_equal(images[:, 0].numpy(), x[i.numpy()])
        idx += i.tolist()
        cls += c.tolist()
    assert idx == list(range(10000)) and cls == y.tolist()

    images, _ = next(train_batches(shards, 1, 2, 64, 0, 0, num_workers=2, image_size=32))
    assert images.shape == (64, 1, 32, 32) and images.dtype == torch.uint8


def test_image_folder_channels_and_unknown_classes(tmp_path) -> None:
    x = load_idx(MNIST / "t10k-images-idx3-ubyte.gz")
    for c, name in enumerate(["a", "b", "c"]):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for j in range(4):
            Image.fromarray(x[4 * c + j]).save(tmp_path / "tree" / name / f"{j}.png")
    rgb = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "tree" / "b" / "zz.png")  # one colour image
    write_shards(tmp_path / "tree", tmp_path / "out", shard_size=5)
    shards = ShardSet.open(str(tmp_path / "out"))
    assert shards.image is None and shards.channels == 3
    batches = list(eval_batches(shards, 0, 1, 8, image_size=24))
    assert [tuple(b[0].shape) for b in batches] == [(8, 3, 24, 24), (5, 3, 24, 24)]
    assert idx_list(batches) == list(range(13))
    with pytest.raises(ValueError, match="pass image_size"):
        list(eval_batches(shards, 0, 1, 8))

    x, _ = digits()
    np.savez(tmp_path / "nolabels.npz", x=x[:100])
    write_shards(tmp_path / "nolabels.npz", tmp_path / "nl")
    (_, _, cls), *_ = eval_batches(ShardSet.open(str(tmp_path / "nl")), 0, 1, 100)
    assert (cls == -1).all()


def test_global_reshuffle_moves_shards_between_ranks(sets) -> None:
    shards = sets["even"]

    def rank0_shards(epoch: int) -> set[int]:
        return {i // 100 for i in idx_list(train_batches(shards, 0, 2, B, 4, epoch))}

    epochs = [rank0_shards(e) for e in range(3)]
    assert epochs[0] == rank0_shards(0)  # deterministic given the seed
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # not a per-rank reshuffle


def test_loader_side_augmentation(sets) -> None:
    from selfclust.config import AugmentConfig
    from selfclust.data.augment import LoaderAugment

    shards, cfg = sets["even"], AugmentConfig(crop_scale=(0.5, 1.0))
    by_idx = {}
    for workers in (0, 2):
        it = train_batches(
            shards,
            1,
            2,
            B,
            0,
            1,
            num_workers=workers,
            loader_augment=cfg,
            image_size=12,
        )
        batches = list(it)
        assert len(batches) == steps_per_epoch(1797, 2, B) and it.stats.skipped == 0
        for images, idx in batches:
            assert images.shape == (B, 1, 12, 12) and images.dtype == torch.uint8
            for i, im in zip(idx.tolist(), images, strict=True):
                # each sample's crop depends on (seed, epoch, idx, view) only, not on workers
                assert torch.equal(by_idx.setdefault(i, im), im)
    x, _ = digits()
    aug = LoaderAugment(cfg, 0, 1, 12, 1)
    buf = io.BytesIO()
    Image.fromarray(x[77]).save(buf, format="PNG")
    crop, _, _ = aug.sample({"__key__": "000000077", "png": buf.getvalue(), "idx": "77"})
    if 77 in by_idx:
        assert torch.equal(by_idx[77], crop)
