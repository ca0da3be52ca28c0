"""Shard writing: round trips from every SOURCE kind on real data, checks, and bad inputs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from selfclust.shards.manifest import load_manifest
from selfclust.shards.verify import verify_shards
from selfclust.shards.write import write_shards
from tests.helpers.data import MNIST, digits, shared_data

CIFAR_ZIP = "cifar10_test_jpeg/cifar10_test_jpeg.zip"  # under the data root (helpers/data.py)


def load_idx(path: Path) -> np.ndarray:
    """Independent IDX reader (the one in the dataset's README)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def save_idx(path: Path, a: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, a.ndim]) + np.array(a.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + a.astype(np.uint8).tobytes())


def read_all(shard_dir: Path) -> list[dict]:
    """Every sample of a shard directory, in shard order, as raw webdataset dicts."""
    m = json.loads((shard_dir / "manifest.json").read_text())
    return [
        s for sh in m["shards"] for s in wds.tarfile_samples([{"url": str(shard_dir / sh["name"])}])
    ]


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture
def digits_npz(tmp_path: Path) -> Path:
    x, y = digits()
    path = tmp_path / "digits.npz"
    np.savez(path, x=x, y=y)
    return path


def test_npz_round_trip(tmp_path: Path, digits_npz: Path) -> None:
    x, y = digits()
    out = tmp_path / "shards"
    m = write_shards(digits_npz, out, shard_size=100)

    assert m == load_manifest(out)
    assert m["format"] == "selfclust-shards/1" and m["num_samples"] == 1797
    assert [s["count"] for s in m["shards"]] == [100] * 17 + [97]
    assert [s["first_idx"] for s in m["shards"]] == list(range(0, 1797, 100))
    assert m["classes"] is None and m["channels"] == 1
    assert m["image"] == {"height": 8, "width": 8, "channels": 1}
    assert m["source"].startswith("npz:")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [s["name"] for s in m["shards"]]
    )
    for s in m["shards"]:
        assert hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]

    samples = read_all(out)
    assert [int(s["idx"]) for s in samples] == list(range(1797))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(1797)]
    images = np.stack([pixels(s["png"]) for s in samples])
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal([int(s["cls"]) for s in samples], y)
    verify_shards(out)

    # The same source gives byte-identical shards.
    again = write_shards(digits_npz, tmp_path / "again", shard_size=100)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in m["shards"]]


def test_rgb_npz_round_trip_without_labels(tmp_path: Path) -> None:
    path = shared_data("cifar10_test_jpeg/cifar10_test_2k.npz")
    with np.load(path) as d:
        x = d["x"][:300]
    np.savez(tmp_path / "c.npz", x=x)
    m = write_shards(tmp_path / "c.npz", tmp_path / "out", shard_size=128)
    assert m["image"] == {"height": 32, "width": 32, "channels": 3}
    assert [s["count"] for s in m["shards"]] == [128, 128, 44]
    samples = read_all(tmp_path / "out")
    assert all("cls" not in s for s in samples)
    np.testing.assert_array_equal(np.stack([pixels(s["png"]) for s in samples]), x)


def test_builtin_mnist_matches_idx_files(tmp_path: Path) -> None:
    x = load_idx(MNIST / "t10k-images-idx3-ubyte.gz")
    y = load_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    out = tmp_path / "mnist"
    m = write_shards("mnist_test", out, shard_size=4000)
    assert m["source"] == "builtin:mnist_test"
    assert [s["count"] for s in m["shards"]] == [4000, 4000, 2000]
    assert m["image"] == {"height": 28, "width": 28, "channels": 1}
    samples = read_all(out)
    assert [int(s["idx"]) for s in samples] == list(range(10000))
    np.testing.assert_array_equal(np.stack([pixels(s["png"]) for s in samples]), x)
    cls = np.array([int(s["cls"]) for s in samples])
    np.testing.assert_array_equal(cls, y)
    assert np.bincount(cls).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    verify_shards(out)


def test_idx_file_and_directory_sources(tmp_path: Path) -> None:
    x = load_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:300]
    y = load_idx(MNIST / "t10k-labels-idx1-ubyte.gz")[:300]
    pair = tmp_path / "pair"
    pair.mkdir()
    save_idx(pair / "train-images-idx3-ubyte.gz", x)
    save_idx(pair / "train-labels-idx1-ubyte.gz", y)
    by_file = write_shards(pair / "train-images-idx3-ubyte.gz", tmp_path / "a", shard_size=128)
    by_dir = write_shards(pair, tmp_path / "b", shard_size=128)
    assert [s["sha256"] for s in by_file["shards"]] == [s["sha256"] for s in by_dir["shards"]]
    samples = read_all(tmp_path / "a")
    np.testing.assert_array_equal(np.stack([pixels(s["png"]) for s in samples]), x)
    np.testing.assert_array_equal([int(s["cls"]) for s in samples], y)

    alone = tmp_path / "alone"  # images without their labels file: no cls
    alone.mkdir()
    shutil.copy(pair / "train-images-idx3-ubyte.gz", alone)
    write_shards(alone, tmp_path / "c", shard_size=1000)
    assert all("cls" not in s for s in read_all(tmp_path / "c"))


def make_png_tree(root: Path, per_class: int = 5) -> tuple[list[str], np.ndarray]:
    """Class folders of grayscale PNGs cut from MNIST; returns class names and the images in
    the order the writer must produce (classes sorted, files sorted)."""
    x = load_idx(MNIST / "t10k-images-idx3-ubyte.gz")
    classes = ["seven", "eight", "nine"]  # created unsorted on purpose
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            ext = ".PNG" if j == 0 else ".png"
            Image.fromarray(x[c * per_class + j]).save(root / name / f"{j:03d}{ext}")
    (root / "nine" / "notes.txt").write_text("not an image")
    order = sorted(range(3), key=lambda c: classes[c])
    expected = np.stack([x[c * per_class + j] for c in order for j in range(per_class)])
    return sorted(classes), expected


def test_image_folder_png_tree(tmp_path: Path) -> None:
    classes, expected = make_png_tree(tmp_path / "tree")
    m = write_shards(tmp_path / "tree", tmp_path / "out", shard_size=4)
    assert m["classes"] == classes == ["eight", "nine", "seven"]
    assert m["num_samples"] == 15 and [s["count"] for s in m["shards"]] == [4, 4, 4, 3]
    assert m["image"] == {"height": 28, "width": 28, "channels": 1}
    samples = read_all(tmp_path / "out")
    assert [int(s["idx"]) for s in samples] == list(range(15))
    assert [int(s["cls"]) for s in samples] == [0] * 5 + [1] * 5 + [2] * 5
    assert all("png" in s for s in samples)  # extension lower-cased: ".PNG" → png
    np.testing.assert_array_equal(np.stack([pixels(s["png"]) for s in samples]), expected)
    verify_shards(tmp_path / "out")


def test_image_folder_keeps_jpeg_bytes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    files = []
    with zipfile.ZipFile(shared_data(CIFAR_ZIP)) as z:
        for cls in ["truck", "airplane", "cat"]:
            (tree / cls).mkdir(parents=True)
            for k in range(4):
                data = z.read(f"test/{cls}/{k:04d}.jpg")
                (tree / cls / f"{k:04d}.jpg").write_bytes(data)
                files.append((cls, k, data))
    files.sort()
    m = write_shards(tree, tmp_path / "out", shard_size=5)
    assert m["classes"] == ["airplane", "cat", "truck"]
    assert m["image"] == {"height": 32, "width": 32, "channels": 3}
    samples = read_all(tmp_path / "out")
    assert [s["jpg"] for s in samples] == [d for _, _, d in files]  # original bytes
    assert [int(s["cls"]) for s in samples] == [0] * 4 + [1] * 4 + [2] * 4

    # A tree mixing grayscale PNGs and RGB JPEGs is read as RGB: no uniform image entry.
    Image.fromarray(load_idx(MNIST / "t10k-images-idx3-ubyte.gz")[0]).save(tree / "cat" / "z.png")
    m = write_shards(tree, tmp_path / "mixed")
    assert m["image"] is None and m["channels"] == 3 and m["num_samples"] == 13


def test_verify_detects_corruption(tmp_path: Path, digits_npz: Path) -> None:
    out = tmp_path / "shards"
    write_shards(digits_npz, out, shard_size=500)
    verify_shards(out)
    shard = out / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-000002.tar"):
        verify_shards(out)
    shard.unlink()
    with pytest.raises(ValueError, match="shard-000002.tar is missing"):
        verify_shards(out)


def test_verify_detects_wrong_indices(tmp_path: Path, digits_npz: Path) -> None:
    """A shard rewritten with one sample's idx changed, its manifest checksum updated to
    match: only the index check can see it, and it names the shard and the sample."""
    import tarfile

    out = tmp_path / "shards"
    write_shards(digits_npz, out, shard_size=500)
    shard = out / "shard-000001.tar"
    with tarfile.open(shard) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(shard, "w") as t:
        for m, data in members:
            if m.name == "000000600.idx":
                data = b"601"  # sample 600 now claims idx 601 (its key still says 600)
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    want = r"shard-000001.tar.*'000000600' has idx 601, expected 600"
    with pytest.raises(ValueError, match=want):
        verify_shards(out)


def bad_source(tmp_path: Path, kind: str) -> Path:
    x, y = digits()
    p = tmp_path / "src.npz"
    if kind == "missing":
        return tmp_path / "nope.npz"
    if kind == "unknown":
        p = tmp_path / "data.parquet"
        p.write_text("1,2,3\n")
    elif kind == "empty":
        np.savez(p, x=np.zeros((0, 8, 8), np.uint8))
    elif kind == "no_x":
        np.savez(p, images=x)
    elif kind == "float_x":
        np.savez(p, x=x.astype(np.float32))
    elif kind == "ndim_x":
        np.savez(p, x=x.reshape(len(x), -1))
    elif kind == "y_length":
        np.savez(p, x=x, y=y[:-1])
    elif kind == "no_images":
        p = tmp_path / "tree"
        (p / "a").mkdir(parents=True)
        (p / "a" / "readme.txt").write_text("hi")
    elif kind == "unreadable":
        p = tmp_path / "tree"
        make_png_tree(p, per_class=2)
        (p / "seven" / "zz_broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return p


BAD = [
    ("missing", FileNotFoundError, "does not exist"),
    ("unknown", ValueError, "unknown source kind"),
    ("empty", ValueError, "empty"),
    ("no_x", ValueError, "needs an array 'x'.*'images'"),
    ("float_x", ValueError, "uint8.*float32"),
    ("ndim_x", ValueError, r"shape \(N, H, W\)"),
    ("y_length", ValueError, "one label per image"),
    ("no_images", ValueError, "no image files"),
    ("unreadable", ValueError, "unreadable image file .*zz_broken.jpg"),
]


@pytest.mark.parametrize("kind,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_sources_fail_clearly_and_write_nothing(tmp_path, kind, error, message) -> None:
    src = bad_source(tmp_path, kind)
    parent = tmp_path / "outputs"
    parent.mkdir()
    with pytest.raises(error, match=message):  # an unreadable file fails only when strict
        write_shards(src, parent / "out", shard_size=3, strict=kind == "unreadable")
    assert list(parent.iterdir()) == []  # no OUT, no manifest, no temp directory


def test_bad_arguments(tmp_path: Path, digits_npz: Path) -> None:
    with pytest.raises(ValueError, match="shard_size"):
        write_shards(digits_npz, tmp_path / "out", shard_size=0)
    with pytest.raises(ValueError, match="image_format"):
        write_shards(digits_npz, tmp_path / "out", image_format="gif")
    assert not (tmp_path / "out").exists()


def test_out_directory_rules(tmp_path: Path, digits_npz: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a selfclust shard directory"):
        write_shards(digits_npz, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="not a directory"):
        write_shards(digits_npz, foreign / "notes.txt")

    empty = tmp_path / "empty"
    empty.mkdir()
    write_shards(digits_npz, empty, shard_size=1000)
    assert [s["count"] for s in load_manifest(empty)["shards"]] == [1000, 797]

    # Overwriting a previous shard directory replaces it entirely.
    write_shards(digits_npz, empty, shard_size=600)
    assert sorted(p.name for p in empty.iterdir()) == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    verify_shards(empty)
    assert no_leftovers(tmp_path)


def test_failed_overwrite_keeps_previous_shards(tmp_path: Path, digits_npz: Path) -> None:
    out = tmp_path / "out"
    before = write_shards(digits_npz, out, shard_size=1000)
    tree = bad_source(tmp_path / "t", "unreadable")  # fails after writing a few shards
    with pytest.raises(ValueError, match="unreadable image file"):
        write_shards(tree, out, shard_size=1, strict=True)
    assert load_manifest(out) == before
    verify_shards(out)
    assert no_leftovers(tmp_path)


def test_load_manifest_errors(tmp_path: Path, digits_npz: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no manifest.json.*selfclust shard SOURCE OUT"):
        load_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    out = tmp_path / "out"
    write_shards(digits_npz, out, shard_size=1000)
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][1]["count"] = 5
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="not a valid selfclust manifest"):
        load_manifest(out)


def test_file_list_source(tmp_path: Path) -> None:
    classes, expected = make_png_tree(tmp_path / "tree", per_class=2)
    files = sorted((tmp_path / "tree").rglob("*.[pP][nN][gG]"))
    lines = ["# path,label", ""]
    lines += [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in files]
    lines.append(str(files[0]))  # absolute path, no label
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    m = write_shards(tmp_path / "list.csv", tmp_path / "out", shard_size=4)
    assert m["source"].startswith("filelist:") and m["source_info"]["kind"] == "filelist"
    assert m["classes"] == classes and m["num_samples"] == len(files) + 1
    samples = read_all(tmp_path / "out")
    want = [classes.index(p.parent.name) for p in files]
    assert [int(s["cls"]) for s in samples[:-1]] == want and "cls" not in samples[-1]
    assert samples[0]["png"] == files[0].read_bytes() == samples[-1]["png"]

    (tmp_path / "ints.txt").write_text(f"{files[1]},7\n{files[2]},-1\n")
    m = write_shards(tmp_path / "ints.txt", tmp_path / "ints")
    assert m["classes"] is None
    assert [s.get("cls") for s in read_all(tmp_path / "ints")] == [b"7", None]
    (tmp_path / "bad.txt").write_text("nope.png,1\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: image file .*nope.png does not exist"):
        write_shards(tmp_path / "bad.txt", tmp_path / "bad", strict=True)
    with pytest.raises(ValueError, match=r"no readable images; 1 skipped: .*nope.png \(file does"):
        write_shards(tmp_path / "bad.txt", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_torchvision_dataset_on_disk(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    x = load_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:500]
    y = load_idx(MNIST / "t10k-labels-idx1-ubyte.gz")[:500]
    for name, a in [("t10k-images-idx3-ubyte", x), ("t10k-labels-idx1-ubyte", y)]:
        header = bytes([0, 0, 0x08, a.ndim]) + np.array(a.shape, ">u4").tobytes()
        (raw / name).write_bytes(header + a.tobytes())
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]:
        (raw / name).write_bytes(b"")  # torchvision checks they exist; split=test never reads them
    m = write_shards("torchvision:MNIST:test", tmp_path / "out", shard_size=200, root=tmp_path)
    assert m["source_info"] == {
        "kind": "torchvision",
        "name": "MNIST",
        "split": "test",
        "root": str(tmp_path.resolve()),
    }
    assert m["classes"][0] == "0 - zero" and m["num_samples"] == 500
    samples = read_all(tmp_path / "out")
    np.testing.assert_array_equal(np.stack([pixels(s["png"]) for s in samples]), x)
    np.testing.assert_array_equal([int(s["cls"]) for s in samples], y)
    with pytest.raises(ValueError, match="cannot open CIFAR10 .*never downloads"):
        write_shards("torchvision:CIFAR10:test", tmp_path / "c", root=tmp_path)
    with pytest.raises(ValueError, match="pass root="):
        write_shards("torchvision:MNIST", tmp_path / "c")


def jpeg_tree(root: Path, n: int = 24, upscale: int = 1) -> Path:
    with zipfile.ZipFile(shared_data(CIFAR_ZIP)) as z:
        for k in range(n):
            cls = ["cat", "dog"][k % 2]
            (root / cls).mkdir(parents=True, exist_ok=True)
            data = z.read(f"test/{cls}/{k:04d}.jpg")
            if upscale > 1:
                with Image.open(io.BytesIO(data)) as im:
                    buf = io.BytesIO()
                    im.resize((32 * upscale, 24 * upscale)).save(buf, format="JPEG", quality=90)
                    data = buf.getvalue()
            (root / cls / f"{k:04d}.jpg").write_bytes(data)
    return root


def test_reencode_resize_bytes_and_parallel_writers(tmp_path: Path) -> None:
    tree = jpeg_tree(tmp_path / "tree", upscale=4)  # 128 x 96 JPEGs
    one = write_shards(tree, tmp_path / "one", encode="png", max_side=64, shard_bytes=60_000)
    two = write_shards(
        tree, tmp_path / "two", encode="png", max_side=64, shard_bytes=60_000, workers=2
    )
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert one["image"] == {"height": 48, "width": 64, "channels": 3}
    assert len(one["shards"]) > 1 and all(s["bytes"] <= 60_000 for s in one["shards"])
    assert one["writer"]["encode"] == "png" and one["writer"]["shard_bytes"] == 60_000
    assert all("png" in s for s in read_all(tmp_path / "one"))

    write_shards(tree, tmp_path / "q", encode="jpeg", quality=50)
    samples = read_all(tmp_path / "q")
    assert all(Image.open(io.BytesIO(s["jpg"])).size == (128, 96) for s in samples)
    assert sum(len(s["jpg"]) for s in samples) < sum(p.stat().st_size for p in tree.rglob("*.jpg"))
    write_shards(tree, tmp_path / "kept", max_side=500)  # nothing to shrink: bytes kept
    assert [s["jpg"] for s in read_all(tmp_path / "kept")] == [
        p.read_bytes() for p in sorted(tree.rglob("*.jpg"), key=lambda p: (p.parent.name, p.name))
    ]
    verify_shards(tmp_path / "kept", decode=True)


def test_post_uploads_shards_then_manifest(tmp_path: Path, digits_npz: Path) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    post = f"cp {{path}} {bucket}/{{name}}.part && mv {bucket}/{{name}}.part {bucket}/{{name}}"
    m = write_shards(digits_npz, tmp_path / "out", shard_size=500, post=post, keep_local=False)
    assert sorted(p.name for p in bucket.iterdir()) == ["manifest.json"] + [
        s["name"] for s in m["shards"]
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json"]
    verify_shards(bucket)
    from selfclust.data.shardset import ShardSet

    assert ShardSet.open(f"pipe:cat {bucket}/{{name}}").num_samples == 1797

    failing = tmp_path / "failing"
    failing.mkdir()
    post = f"case {{name}} in *2.tar) exit 5;; *) cp {{path}} {failing}/{{name}};; esac"
    from selfclust.shards.upload import UploadError

    with pytest.raises(UploadError, match="post command for shard-000002.tar failed"):
        write_shards(digits_npz, tmp_path / "out2", shard_size=500, post=post)
    assert "manifest.json" not in [p.name for p in failing.iterdir()]
    assert not (tmp_path / "out2").exists() and no_leftovers(tmp_path)


def test_cli_shard_and_verify(tmp_path: Path, digits_npz: Path, capsys) -> None:
    from selfclust.cli import main

    args = ["shard", str(digits_npz), str(tmp_path / "o"), "--shard-bytes", "100KB"]
    assert main(args + ["--encode", "jpeg", "--quality", "80", "--workers", "2"]) == 0
    m = load_manifest(tmp_path / "o")
    assert m["writer"]["shard_bytes"] == 100_000 and m["writer"]["quality"] == 80
    assert main(["shard", "--verify", "--decode", str(tmp_path / "o")]) == 0
    assert "1797 samples" in capsys.readouterr().out
    shard = tmp_path / "o" / m["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:3000])
    assert main(["shard", "--verify", str(tmp_path / "o")]) == 2
    assert "shard-000000.tar" in capsys.readouterr().err
    assert main(["shard", str(digits_npz), str(tmp_path / "x"), "--shard-bytes", "lots"]) == 2
    assert "cannot read 'lots' as a size" in capsys.readouterr().err


def test_verify_decode_finds_corrupt_image(tmp_path: Path, digits_npz: Path) -> None:
    write_shards(digits_npz, tmp_path / "s", shard_size=1000)
    path = tmp_path / "s" / "shard-000001.tar"
    samples = [s for s in read_all(tmp_path / "s") if int(s["idx"]) >= 1000]
    samples[3]["png"] = b"\x89PNG broken"
    with open(path, "wb") as f, wds.TarWriter(f) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if k != "__url__"})
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["shards"][1]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    verify_shards(tmp_path / "s")  # checksums and indices are fine
    with pytest.raises(ValueError, match="shard-000001.tar: image 000001003 does not decode"):
        verify_shards(tmp_path / "s", decode=True)
