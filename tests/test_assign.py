"""``selfclust assign``: the model's own predictions for every image, the same on 1 and 2
ranks, an image folder giving what its shards give, bad images counted and listed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfclust import cli
from selfclust.assign import AssignError, assign
from selfclust.data.augment import normalize
from selfclust.data.shardset import ShardSet
from selfclust.data.streams import eval_batches
from selfclust.eval.evaluate import load_run
from selfclust.export import write_export
from selfclust.shards.write import write_shards
from tests.helpers.data import digits
from tests.test_export import SMALL, checkpoint


@pytest.fixture(scope="module")
def shards(digits_npz: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("assign") / "digits"
    write_shards(str(digits_npz), out, shard_size=400)
    return out


@pytest.fixture(scope="module")
def ckpt(shards: Path) -> str:
    return checkpoint(shards, *SMALL)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_assignments_are_the_models_predictions_on_one_and_two_ranks(
    shards: Path, ckpt: str, tmp_path: Path
):
    model, *_ = load_run(ckpt)
    want = {}  # the evaluation path: selfclust's own shard stream and normalisation
    with torch.no_grad():
        for images, idx, _ in eval_batches(ShardSet.open(shards), 0, 1, 500):
            preds = torch.stack([lg.argmax(1) for lg in model(normalize(images)).logits])
            for i, pred in zip(idx.tolist(), preds.t(), strict=True):
                want[f"{i:09d}"] = pred.tolist()
    one = assign(ckpt, shards, tmp_path / "one.csv", heads="all", workers=1)
    two = assign(ckpt, shards, tmp_path / "two.csv", heads="all", workers=2)
    assert one["ranks"] == 1 and two["ranks"] == 2 and one["assigned"] == 1797
    a, b = read_csv(tmp_path / "one.csv"), read_csv(tmp_path / "two.csv")
    assert a == b  # the same rows, in the same (sample) order
    assert [r["key"] for r in a] == sorted(want)
    for r in a:
        assert [int(r[f"cluster_h{t}"]) for t in range(3)] == want[r["key"]]
        assert 0.0 < float(r["probability_h0"]) <= 1.0


def test_export_file_and_parquet_best_head(shards: Path, ckpt: str, tmp_path: Path):
    import pyarrow.parquet as pq

    write_export(ckpt, tmp_path / "m.pt")
    done = assign(tmp_path / "m.pt", shards, tmp_path / "a.parquet")
    table = pq.read_table(tmp_path / "a.parquet").to_pydict()
    assert done["heads"] == [1] and list(table) == ["key", "cluster", "probability"]
    full = read_csv_all(ckpt, shards, tmp_path)
    assert table["cluster"] == [int(r["cluster_h1"]) for r in full]


def read_csv_all(ckpt: str, shards: Path, tmp_path: Path) -> list[dict[str, str]]:
    assign(ckpt, shards, tmp_path / "all.csv", heads="all")
    return read_csv(tmp_path / "all.csv")


def test_image_folder_matches_its_shards_and_lists_bad_files(ckpt: str, tmp_path: Path):
    x, y = digits()
    folder = tmp_path / "images"
    for i in range(60):
        d = folder / f"class{y[i]}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(d / f"{i:03d}.png")
    (folder / "class0" / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "class1" / "empty.jpg").write_bytes(b"")
    (folder / "class1" / "README.txt").write_text("not an image")
    done = assign(ckpt, folder, tmp_path / "folder.csv", heads="all", workers=2)
    assert (done["assigned"], done["skipped"], done["ignored"]) == (60, 2, 1)
    skipped = read_csv(Path(done["skipped_file"]))
    assert sorted(r["key"] for r in skipped) == ["class0/broken.png", "class1/empty.jpg"]
    assert all("not a readable image" in r["reason"] for r in skipped)
    rows = read_csv(tmp_path / "folder.csv")
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)
    # The same files sharded first (the shard writer skips the same two): the same clusters.
    write_shards(str(folder), tmp_path / "shards", shard_size=25)
    via_shards = read_csv_all(ckpt, tmp_path / "shards", tmp_path)
    assert [r["cluster_h0"] for r in rows] == [r["cluster_h0"] for r in via_shards]
    probs = np.array([float(r["probability_h2"]) for r in rows])
    assert np.allclose(probs, [float(r["probability_h2"]) for r in via_shards], atol=2e-6)


def test_bad_requests_are_one_line_errors(shards: Path, ckpt: str, tmp_path: Path, capsys):
    with pytest.raises(AssignError, match="name a .csv or a .parquet"):
        assign(ckpt, shards, tmp_path / "a.txt")
    with pytest.raises(AssignError, match="head numbers 0..2"):
        assign(ckpt, shards, tmp_path / "a.csv", heads="5")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    code = cli.main(["assign", ckpt, "--data", str(tmp_path / "empty"), "--out", "a.csv"])
    err = capsys.readouterr().err
    assert code == 2 and "holds no image files" in err and "Traceback" not in err
