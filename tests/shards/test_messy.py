"""Sharding the data users really have: image folders and file lists holding files that cannot
be read (gone, empty, truncated, not images, decompression bombs) among good ones. Real files
on disk, no mocks."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from selfclust.shards.manifest import load_manifest
from selfclust.shards.verify import verify_shards
from selfclust.shards.write import write_shards
from tests.helpers.data import digits


def encoded(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def noise(seed: int, side: int = 48) -> np.ndarray:
    """RGB noise: compresses badly, so cutting the file in half cuts into the image data."""
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), np.uint8)


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def bomb_png(side: int) -> bytes:
    """A valid little PNG whose header claims side × side pixels: refused before decoding."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# Bad files: name → (bytes, a word the reason in skipped.txt must hold).
BAD = {
    "empty.png": (b"", "empty file (0 bytes)"),
    "half.jpg": (half(encoded(noise(1), "JPEG")), "truncated"),
    "half.png": (half(encoded(noise(2), "PNG")), "truncated"),
    "text.jpg": (b"these are my notes, not a photo\n", "not an image Pillow can read"),
    "bomb.png": (bomb_png(100_000), "decompression bomb"),  # over 2 x MAX_IMAGE_PIXELS
    "bomb_band.png": (bomb_png(10_000), "decompression bomb"),  # between 1 x and 2 x
}
# Where each bad file goes, among 40 good ones per class (a few in each 64-item chunk).
PLACES = {
    "a": ["empty.png", "half.jpg"],
    "b": ["half.png", "text.jpg"],
    "c": ["bomb.png", "bomb_band.png"],
}


def messy_tree(root: Path, per_class: int = 40) -> tuple[list[tuple[Path, bytes, int]], list]:
    """Class folders a, b, c of good grayscale PNGs and RGB JPEGs with the BAD files among
    them. Returns the good files (path, bytes, class) and the bad ones (path, reason word), each
    in source order (class, then file name)."""
    x, _ = digits()
    good, bad = [], []
    for c, cls in enumerate(sorted(PLACES)):
        (root / cls).mkdir(parents=True)
        files: dict[str, bytes | None] = {}
        for j in range(per_class):
            if j % 3:
                big = np.kron(x[40 * c + j] * 15, np.ones((4, 4), np.uint8))  # [32, 32] 0..240
                files[f"{j:03d}.png"] = encoded(big, "PNG")
            else:
                files[f"{j:03d}.jpg"] = encoded(noise(100 * c + j, 16), "JPEG")
        for k, name in enumerate(PLACES[cls]):
            files[f"{10 + 17 * k:03d}_{name}"] = None  # sorts between the good files
        for name in sorted(files):
            path = root / cls / name
            data = files[name]
            if data is None:
                data, word = BAD[name.split("_", 1)[1]]
                bad.append((path, word))
            else:
                good.append((path, data, c))
            path.write_bytes(data)
    return good, bad


def read_all(out: Path) -> list[dict]:
    m = json.loads((out / "manifest.json").read_text())
    return [s for sh in m["shards"] for s in wds.tarfile_samples([{"url": str(out / sh["name"])}])]


def skip_lines(out: Path) -> list[tuple[str, str]]:
    text = (out / "skipped.txt").read_text()
    assert text.endswith("\n")
    return [tuple(line.split("\t")) for line in text.splitlines()]  # type: ignore[misc]


def test_messy_folder_skips_lists_and_keeps_idx_contiguous(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    good, bad = messy_tree(tree)
    out = tmp_path / "one"
    m = write_shards(tree, out, shard_size=25)

    assert m["skipped"] == len(bad) == 6 and m["num_samples"] == len(good) == 120
    assert m == load_manifest(out)
    assert [s["count"] for s in m["shards"]] == [25] * 4 + [20]
    assert [s["first_idx"] for s in m["shards"]] == [0, 25, 50, 75, 100]
    lines = skip_lines(out)
    assert [p for p, _ in lines] == [str(p.resolve()) for p, _ in bad]
    for (_, reason), (_, word) in zip(lines, bad, strict=True):
        assert word in reason, reason
    assert "0x" not in "".join(r for _, r in lines)  # no object addresses: same in any process
    names = sorted(["manifest.json", "skipped.txt"] + [s["name"] for s in m["shards"]])
    assert sorted(p.name for p in out.iterdir()) == names

    samples = read_all(out)
    assert [int(s["idx"]) for s in samples] == list(range(120))  # contiguous over kept files
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(120)]
    assert [s.get("png", s.get("jpg")) for s in samples] == [d for _, d, _ in good]  # kept bytes
    assert [int(s["cls"]) for s in samples] == [c for _, _, c in good]
    verify_shards(out, decode=True)

    # Three writer processes: the same shards, manifest and skip list.
    three = write_shards(tree, tmp_path / "three", shard_size=25, workers=3)
    assert three == m
    assert (tmp_path / "three" / "skipped.txt").read_bytes() == (out / "skipped.txt").read_bytes()

    # An OUT holding a skip list is a shard directory: rewriting it is allowed, and a clean
    # source leaves no stale skip list behind.
    np.savez(tmp_path / "digits.npz", x=digits()[0][:50])
    clean = write_shards(tmp_path / "digits.npz", out)
    assert clean["skipped"] == 0 and not (out / "skipped.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("max_side", [None, 8], ids=["kept", "resized"])
def test_truncated_files_found_whether_resized_or_not(tmp_path: Path, max_side) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for k in range(3):
        (tree / f"{k}_good.jpg").write_bytes(encoded(noise(k), "JPEG"))
        (tree / f"{k}_good.png").write_bytes(encoded(noise(k), "PNG"))
    (tree / "9_half.jpg").write_bytes(BAD["half.jpg"][0])
    (tree / "9_half.png").write_bytes(BAD["half.png"][0])
    m = write_shards(tree, tmp_path / "out", max_side=max_side)
    assert m["skipped"] == 2 and m["num_samples"] == 6 and m["classes"] is None
    lines = skip_lines(tmp_path / "out")
    assert [Path(p).name for p, _ in lines] == ["9_half.jpg", "9_half.png"]
    assert all("truncated" in r for _, r in lines)
    side = 8 if max_side else 48
    assert m["image"] == {"height": side, "width": side, "channels": 3}


def test_strict_stops_at_the_first_bad_file(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    good, bad = messy_tree(tree)
    parent = tmp_path / "outputs"
    parent.mkdir()
    first = str(bad[0][0].resolve())
    for workers in (1, 3):
        with pytest.raises(ValueError, match=f"unreadable image file {first}: empty file"):
            write_shards(tree, parent / "out", workers=workers, strict=True)
        assert list(parent.iterdir()) == []  # no OUT, no skip list, no temp directory

    bombs = tmp_path / "bombs" / "a"
    bombs.mkdir(parents=True)
    (bombs / "good.png").write_bytes(good[1][1])
    (bombs / "zz.png").write_bytes(BAD["bomb.png"][0])
    with pytest.raises(ValueError, match="refused image file .*zz.png.*decompression bomb"):
        write_shards(bombs.parent, parent / "out", strict=True)
    assert write_shards(bombs.parent, parent / "out")["skipped"] == 1


def test_every_file_bad_is_an_error_naming_them(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name, (data, _) in BAD.items():
        (tree / name).write_bytes(data)
    parent = tmp_path / "outputs"
    parent.mkdir()
    want = (
        r"source .*tree holds no readable images; 6 skipped: .*bomb.png \(decompression bomb"
        r".*bomb_band.png .*empty.png \(empty file \(0 bytes\)\); and 3 more"
    )
    with pytest.raises(ValueError, match=want):
        write_shards(tree, parent / "out", workers=2)
    assert list(parent.iterdir()) == []


def test_file_list_skips_missing_and_broken_files(tmp_path: Path) -> None:
    good, _ = messy_tree(tmp_path / "tree", per_class=3)
    (tmp_path / "tree" / "notes.jpg").write_bytes(BAD["text.jpg"][0])
    rows = [f"tree/a/{good[0][0].name},cat", "tree/gone.png,dog", "tree/notes.jpg,cat"]
    rows += [f"{good[1][0]},dog", "tree/b/also_gone.jpg"]
    (tmp_path / "list.txt").write_text("\n".join(rows) + "\n")
    m = write_shards(tmp_path / "list.txt", tmp_path / "out")
    assert m["skipped"] == 3 and m["num_samples"] == 2 and m["classes"] == ["cat", "dog"]
    root = tmp_path.resolve()
    assert skip_lines(tmp_path / "out") == [
        (str(root / "tree" / "gone.png"), "file does not exist"),
        (str(root / "tree" / "notes.jpg"), "not an image Pillow can read"),
        (str(root / "tree" / "b" / "also_gone.jpg"), "file does not exist"),
    ]
    samples = read_all(tmp_path / "out")
    assert [s["idx"] for s in samples] == [b"0", b"1"] and [s["cls"] for s in samples] == [
        b"0",
        b"1",
    ]
    assert samples[1]["png"] == good[1][1]
    with pytest.raises(ValueError, match=r"list.txt:2: image file .*gone.png does not exist"):
        write_shards(tmp_path / "list.txt", tmp_path / "strict", strict=True)


def test_post_uploads_the_skip_list_before_the_manifest(tmp_path: Path) -> None:
    good, bad = messy_tree(tmp_path / "tree", per_class=6)
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    log = tmp_path / "uploads.log"
    post = f"cp {{path}} {bucket}/{{name}} && echo {{name}} >> {log}"
    m = write_shards(tmp_path / "tree", tmp_path / "out", shard_size=5, post=post, keep_local=False)
    order = log.read_text().split()
    assert order[-1] == "manifest.json" and "skipped.txt" in order[:-1]
    assert sorted(order[:-1]) == sorted([s["name"] for s in m["shards"]] + ["skipped.txt"])
    assert (bucket / "skipped.txt").read_bytes() == (tmp_path / "out" / "skipped.txt").read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "skipped.txt"]
    verify_shards(bucket)


def test_cli_reports_the_skipped_files(tmp_path: Path, capsys) -> None:
    from selfclust.cli import main

    messy_tree(tmp_path / "tree", per_class=5)
    out = tmp_path / "out"
    assert main(["shard", str(tmp_path / "tree"), str(out), "--workers", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (
        f"wrote 15 samples in 1 shards to {out} (manifest.json); "
        f"skipped 6 unreadable files, listed in {out / 'skipped.txt'}"
    )
    assert main(["shard", str(tmp_path / "tree"), str(tmp_path / "s"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "unreadable image file" in err and "empty.png: empty file (0 bytes)" in err
    assert not (tmp_path / "s").exists()
