"""Reading shards from anywhere (disk, brace patterns, a real HTTP server, pipe: commands) and
surviving bad data: corrupt images, truncated or unreadable shards, missing URLs, bombs."""

from __future__ import annotations

import http.server
import io
import json
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from selfclust.data.plan import steps_per_epoch
from selfclust.data.reader import DataStats, decode, tar_samples
from selfclust.data.shardset import ShardSet
from selfclust.data.streams import eval_batches, train_batches
from selfclust.data.urls import ShardNotFound, open_url, parse_spec
from selfclust.shards.verify import verify_shards
from selfclust.shards.write import write_shards
from tests.helpers.data import digits
from tests.helpers.spawn import run_ranks

B = 32
N = 1797


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    x, y = digits()
    np.savez(root / "digits.npz", x=x, y=y)
    write_shards(root / "digits.npz", root / "set", shard_size=200)  # 9 shards, last 197
    return root / "set"


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """A real HTTP server (python's http.server) on 127.0.0.1 serving ``directory``."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def everything(shards: ShardSet, world: int = 2, workers: int = 1) -> list:
    """Every batch of an epoch and a label pass on every rank, as plain lists."""
    out = []
    for rank in range(world):
        for images, idx in train_batches(shards, rank, world, B, 3, 1, num_workers=workers):
            out.append((images.numpy().tobytes(), idx.tolist()))
        for images, idx, cls in eval_batches(shards, rank, world, 100, num_workers=workers):
            out.append((images.numpy().tobytes(), idx.tolist(), cls.tolist()))
    return out


def test_specs_parse() -> None:
    s = parse_spec("/d/shard-{000000..000002}.tar")
    assert (s.template, s.manifest_url) == ("/d/{name}", "/d/manifest.json")
    assert s.names == ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar")
    p = parse_spec("pipe:aws s3 cp s3://b/x/{name} -")
    assert p.url("shard-000001.tar") == "pipe:aws s3 cp s3://b/x/shard-000001.tar -"
    assert p.manifest_url == "pipe:aws s3 cp s3://b/x/manifest.json -"
    assert parse_spec("http://h/a/").url("s.tar") == "http://h/a/s.tar"
    assert parse_spec("file:///d/manifest.json").manifest_url == "/d/manifest.json"
    with pytest.raises(ValueError, match="needs \\{name\\}"):
        parse_spec("pipe:cat /d/shard.tar")


def test_http_pipe_and_brace_equal_disk(clean: Path) -> None:
    disk = ShardSet.open(clean)
    expected = everything(disk)
    pattern = str(clean / "shard-{000000..000008}.tar")
    assert ShardSet.open(pattern).urls == disk.urls
    with serve(clean) as base:
        via_http = ShardSet.open(base + "/")
        assert via_http.urls[0] == base + "/shard-000000.tar"
        assert everything(via_http) == expected
    piped = ShardSet.open(f"pipe:cat {clean}/{{name}}")
    assert everything(piped, workers=0) == everything(disk, workers=0)
    with pytest.raises(ValueError, match="must name exactly the 9 shards.*shard-000008"):
        ShardSet.open(str(clean / "shard-{000000..000007}.tar"))
    assert verify_shards(f"pipe:cat {clean}/{{name}}")["num_samples"] == N


def with_manifest(src: Path, dst: Path, edit) -> Path:
    """A copy of a shard dir whose shards ``edit(name, bytes) -> bytes | None`` may change."""
    dst.mkdir()
    m = json.loads((src / "manifest.json").read_text())
    for s in m["shards"]:
        data = edit(s["name"], (src / s["name"]).read_bytes())
        if data is not None:
            (dst / s["name"]).write_bytes(data)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def rewrite(data: bytes, change) -> bytes:
    """Rewrite a tar shard, passing each sample through ``change(sample) -> sample``."""
    out = io.BytesIO()
    with wds.TarWriter(out) as w:
        for s in tar_samples(io.BytesIO(data)):
            w.write(change(s))
    return out.getvalue()


def bomb_png(side: int = 100_000) -> bytes:
    """A valid little PNG whose header claims side × side pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BAD = {5: b"\xff\xd8 not an image", 250: bomb_png(), 1500: b""}  # idx → replacement bytes


@pytest.fixture(scope="module")
def corrupt(clean: Path, tmp_path_factory) -> Path:
    def edit(name: str, data: bytes) -> bytes:
        def change(s: dict) -> dict:
            if int(s["idx"]) in BAD:
                s["png"] = BAD[int(s["idx"])]
            return s

        return rewrite(data, change)

    return with_manifest(clean, tmp_path_factory.mktemp("c") / "set", edit)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1)])
def test_corrupt_images_skipped_and_counted(corrupt: Path, world: int, workers: int) -> None:
    shards = ShardSet.open(corrupt)
    x, _ = digits()
    seen, stats = [], DataStats()
    for rank in range(world):
        it = eval_batches(shards, rank, world, 64, num_workers=workers)
        for images, idx, _ in it:
            np.testing.assert_array_equal(images[:, 0].numpy(), x[idx.numpy()])
            seen += idx.tolist()
        stats.add(it.stats)
    assert sorted(seen) == sorted(set(range(N)) - set(BAD))  # the rest exactly once
    assert stats.corrupt_images == len(BAD) and stats.skipped + len(seen) == N

    steps = steps_per_epoch(N, world, B)
    for rank in range(world):
        it = train_batches(shards, rank, world, B, 0, 2, num_workers=workers)
        batches = list(it)
        assert len(batches) == steps and all(i.shape == (B,) for _, i in batches)
        got = {i for _, idx in batches for i in idx.tolist()}
        assert not got & set(BAD)
        for images, idx in batches:
            np.testing.assert_array_equal(images[:, 0].numpy(), x[idx.numpy()])


def test_corrupt_counts_reach_every_rank_of_a_train_epoch(corrupt: Path) -> None:
    """An epoch that reads every sample exactly once (1797 = 599 batches of 3) meets and
    counts each bad image once; their slots hold other samples of the same batch."""
    shards = ShardSet.open(corrupt)
    it = train_batches(shards, 0, 1, 3, 0, 0, shuffle_buffer=50)
    idx = [i for _, b in it for i in b.tolist()]
    assert len(idx) == N and set(idx) == set(range(N)) - set(BAD)
    assert it.stats.corrupt_images == len(BAD) == 3
    assert it.stats.missing_samples == 0 and it.stats.bad_shards == {}


def test_bomb_refused_by_decoder_and_writer(tmp_path: Path) -> None:
    assert decode({"__key__": "000000000", "png": bomb_png(), "idx": "0"}, 1, None) is None
    (tmp_path / "tree" / "a").mkdir(parents=True)
    Image.fromarray(digits()[0][0]).save(tmp_path / "tree" / "a" / "ok.png")
    (tmp_path / "tree" / "a" / "zz.png").write_bytes(bomb_png())
    with pytest.raises(ValueError, match="zz.png.*decompression bomb"):
        write_shards(tmp_path / "tree", tmp_path / "out", strict=True)
    manifest = write_shards(tmp_path / "tree", tmp_path / "out")  # default: skipped and listed
    assert manifest["num_samples"] == 1 and manifest["skipped"] == 1
    assert "zz.png" in (tmp_path / "out" / "skipped.txt").read_text()


@pytest.fixture(scope="module")
def truncated(clean: Path, tmp_path_factory) -> Path:
    def edit(name: str, data: bytes) -> bytes:
        return data[: len(data) // 2 + 100] if name == "shard-000003.tar" else data

    return with_manifest(clean, tmp_path_factory.mktemp("t") / "set", edit)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_reported_and_skipped(truncated: Path, workers: int) -> None:
    shards = ShardSet.open(truncated)
    seen, stats = [], DataStats()
    for rank in range(2):
        it = eval_batches(shards, rank, 2, 64, num_workers=workers)
        seen += [i for _, idx, _ in it for i in idx.tolist()]
        stats.add(it.stats)
    bad = shards.urls[3]
    assert list(stats.bad_shards) == [bad] and "shard-000003.tar" in bad
    assert len(seen) == len(set(seen)) and len(seen) + stats.skipped == N
    assert 0 < stats.missing_samples < 200
    assert set(range(600)) <= set(seen) and set(range(800, N)) <= set(seen)
    for rank in range(2):
        batches = list(train_batches(shards, rank, 2, B, 0, 0, num_workers=workers))
        assert len(batches) == steps_per_epoch(N, 2, B)
    with pytest.raises(ValueError, match="shard-000003.tar holds 10[0-9] samples, the manifest"):
        verify_shards(truncated)


def test_missing_shard_is_an_error_naming_it(clean: Path, tmp_path: Path) -> None:
    gone = with_manifest(clean, tmp_path / "set", lambda n, d: None if n.endswith("4.tar") else d)
    shards = ShardSet.open(gone)
    with pytest.raises(ShardNotFound, match="shard-000004.tar"):
        for rank in range(2):
            list(eval_batches(shards, rank, 2, 64, num_workers=1))
    with pytest.raises(ValueError, match="shard-000004.tar is missing"):
        verify_shards(gone)
    with serve(gone) as base:
        with pytest.raises(ShardNotFound, match=r"shard-000004.tar not found \(HTTP 404"):
            list(train_batches(ShardSet.open(base), 0, 1, B, 0, 0))
    # Nothing listening: a clear error once the (here 1 s) retry deadline is spent.
    with pytest.raises(ShardNotFound, match="127.0.0.1:9/x.tar not found.*unreachable"):
        open_url("http://127.0.0.1:9/x.tar", timeout_s=1)


def test_stalled_or_failing_pipe_never_hangs(clean: Path) -> None:
    with pytest.raises(ShardNotFound, match="no data for 1 s"):
        open_url("pipe:sleep 30", timeout_s=1).read()
    with pytest.raises(ShardNotFound, match="exited with status 3"):
        open_url("pipe:echo oops >&2; exit 3", timeout_s=5).read()
    shard = clean / "shard-000001.tar"
    with pytest.raises(OSError, match="exited with status 4") as err:  # after some bytes
        open_url(f"pipe:head -c 20000 {shard}; exit 4", timeout_s=5).read()
    assert not isinstance(err.value, ShardNotFound)
    # A download that dies half-way: the shard is reported and its rest skipped.
    cmd = f"cat {clean}/{{name}} | head -c 100000; exit 1"
    spec = f"pipe:if [ {{name}} = shard-000002.tar ]; then {cmd}; else cat {clean}/{{name}}; fi"
    it = eval_batches(ShardSet.open(spec), 0, 1, 500)
    seen = sum(len(i) for _, i, _ in it)
    (url, why), *others = it.stats.bad_shards.items()
    assert not others and "head -c 100000" in url and "exited with status 1" in why
    assert 0 < it.stats.missing_samples < 200 and seen + it.stats.missing_samples == N


def test_worker_with_only_unreadable_shards_fails_instead_of_looping(clean, tmp_path) -> None:
    empty = with_manifest(clean, tmp_path / "set", lambda n, d: d[:700])
    with pytest.raises(RuntimeError, match="no shard of this loader worker could be read"):
        list(train_batches(ShardSet.open(empty), 0, 1, B, 0, 0))


def _embed_rank(rank: int, world: int, spec: str, claimed: int) -> list[int] | str:
    """The trainer's label pass (``labelling.embed``) on gloo ranks, told the set holds
    ``claimed`` samples: (rows read here, skipped over all ranks), or the error it raised."""
    from selfclust.collectives import WORLD
    from selfclust.labels.label_pass import embed

    it = eval_batches(ShardSet.open(spec), rank, world, 64)
    try:
        e = embed(lambda x: x.flatten(1).mean(1, keepdim=True), it, torch.device("cpu"), None,
                  claimed, group=WORLD)  # fmt: skip
    except RuntimeError as err:
        return str(err)
    return [len(e.idx), e.skipped]


def test_label_pass_count_all_reduced_over_ranks(corrupt: Path, tmp_path: Path) -> None:
    """Seen + skipped is summed over the ranks and must equal N; when it does not (the
    manifest claims 5 more), every rank raises the same error instead of one hanging."""
    counts = run_ranks(_embed_rank, 2, tmp_path / "ok", str(corrupt), N)
    assert sum(c[0] for c in counts) == N - len(BAD) and all(c[1] == len(BAD) for c in counts)
    errors = run_ranks(_embed_rank, 2, tmp_path / "bad", str(corrupt), N + 5)
    want = f"label pass saw {N - len(BAD)} samples (and skipped {len(BAD)} bad ones)"
    assert all(isinstance(e, str) and want in e and f"says {N + 5}" in e for e in errors)


def test_training_survives_corrupt_images_and_reports_them(corrupt: Path, tmp_path: Path) -> None:
    """2 gloo ranks train on shards with 3 bad images: the run completes, the label passes
    skip and count them, and summary.json reports what training met."""
    from tests.train.test_loop import run_rank

    out = run_ranks(run_rank, 2, tmp_path / "ranks", str(corrupt), str(tmp_path), None)
    summary = out[0]["summary"]
    assert summary["steps"] == 2 * (N // 64)
    # each epoch meets every bad image once, on whichever rank reads it
    assert summary["data_corrupt_images"] == 2 * len(BAD)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    passes = [x for x in lines if x.get("event") in ("relabel", "init_kmeans_pixels")]
    assert passes and all(x["data_skipped"] == len(BAD) for x in passes)
    assert summary["num_samples"] == N - len(BAD)  # evaluation scores the readable samples
