"""selfclust.rundir on the file system alone (no Ray, no training): the run's identity and its
refusals, the finished-run shortcut, which checkpoint is the latest, label changes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from selfclust.checkpoint import (
    DIGEST_FILE,
    STATE_FILE,
    IncompatibleCheckpoint,
    is_complete,
    write_state,
)
from selfclust.config import load_config
from selfclust.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    DamagedRunFile,
    atomic_write,
    default_output,
    default_run_dir,
    finished_summary,
    label_changes,
    latest_checkpoint,
    read_identity,
    resolve_checkpoint,
    run_identity,
    write_json,
    write_summary,
)


def checkpoint(storage: Path, name: str, mtime: float | None = None) -> Path:
    """A complete checkpoint ``storage/name`` (as Ray's storage holds them); its digest file's
    mtime set to ``mtime`` (what orders checkpoints)."""
    dest = storage / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(write_state({"format": 1, "name": name, "x": torch.arange(4)}), dest)
    if mtime is not None:
        os.utime(dest / DIGEST_FILE, (mtime, mtime))
    assert is_complete(dest)
    return dest


def damage(ckpt: Path, how: str) -> None:
    if how == "truncated":
        data = (ckpt / STATE_FILE).read_bytes()
        (ckpt / STATE_FILE).write_bytes(data[: len(data) // 2])
    elif how == "no_digest":
        (ckpt / DIGEST_FILE).unlink()
    elif how == "no_state":
        (ckpt / STATE_FILE).unlink()
    else:
        assert how == "deleted"
        shutil.rmtree(ckpt)
    assert not is_complete(ckpt)


# ---------------------------------------------------------------- identity


def test_run_identity_created_once_and_kept(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = load_config(None, ["optim.lr=0.1"])
    info = run_identity(run, cfg)
    assert info["name"].startswith("selfclust-") and info["wandb_id"].startswith("sc")
    assert info["name"][len("selfclust-") :] == info["wandb_id"][2:]  # one token
    assert json.loads((run / RUN_FILE).read_text()) == info
    again = run_identity(run, cfg)
    assert (again["name"], again["wandb_id"]) == (info["name"], info["wandb_id"])
    saved, read = read_identity(run)
    assert saved == again and read == cfg
    # another run dir, another identity
    other = run_identity(tmp_path / "other", cfg)
    assert other["wandb_id"] != info["wandb_id"]


def test_run_identity_accepts_how_to_run_changes(tmp_path: Path) -> None:
    """Workers and logging may change between reruns; the new values are recorded."""
    run = tmp_path / "run"
    first = run_identity(run, load_config(None, []))
    cfg = load_config(None, ["trainer.num_workers=4", "trainer.log_every=7"])
    info = run_identity(run, cfg)
    assert info["wandb_id"] == first["wandb_id"]
    assert info["config"]["trainer"]["num_workers"] == 4
    assert read_identity(run)[1].trainer.log_every == 7


def test_run_identity_refuses_another_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_identity(run, load_config(None, ["optim.lr=0.1"]))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(IncompatibleCheckpoint, match="another config") as e:
        run_identity(run, load_config(None, ["optim.lr=0.2", "method.clusters=7"]))
    assert "optim.lr" in str(e.value) and "method.clusters" in str(e.value)
    assert str(run) in str(e.value)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing rewritten


def test_run_identity_refuses_a_foreign_non_empty_dir(tmp_path: Path) -> None:
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("someone else's")
    with pytest.raises(FileExistsError, match="not a selfclust run"):
        run_identity(run, load_config(None, []))
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # nothing written
    # an empty dir, or one holding only shards/ (built-in data sharded on first use), is fine
    (tmp_path / "empty").mkdir()
    run_identity(tmp_path / "empty", load_config(None, []))
    (tmp_path / "sharded" / "shards").mkdir(parents=True)
    run_identity(tmp_path / "sharded", load_config(None, []))
    assert (tmp_path / "sharded" / RUN_FILE).is_file()
    assert (tmp_path / "sharded" / CONFIG_FILE).is_file()


def test_atomic_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    write_json(tmp_path / "a" / "b.json", {"x": 1})  # parents created
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"x": 1}
    atomic_write(tmp_path / "a" / "b.json", "replaced")
    write_summary(tmp_path / "a", {"steps": 3})
    assert (tmp_path / "a" / "b.json").read_text() == "replaced"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.json", SUMMARY_FILE]


# ---------------------------------------------------------------- finished runs


def test_finished_summary_needs_an_intact_final_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert finished_summary(run) is None  # no summary yet
    write_summary(run, {"steps": 10})  # no checkpoint named
    assert finished_summary(run) is None
    for how in ("truncated", "no_digest", "no_state", "deleted"):
        final = checkpoint(run / "ray" / "r", f"checkpoint_{how}")
        summary = {"steps": 10, "checkpoint": str(final)}
        write_summary(run, summary)
        assert finished_summary(run) == summary
        damage(final, how)
        assert finished_summary(run) is None, how  # trained (resumed) again instead


# ---------------------------------------------------------------- latest checkpoint


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    storage = run / "ray" / "selfclust-test"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        latest_checkpoint(run)
    # ordered by the digest file's mtime (when it was completed), not by name
    old = checkpoint(storage, "checkpoint_000009", mtime=1_000)
    new = checkpoint(storage, "checkpoint_000002", mtime=2_000)
    mid = checkpoint(storage, "checkpoint_000005", mtime=1_500)
    assert latest_checkpoint(run) == new
    # incomplete ones are never chosen, however new
    for how, t in (("truncated", 3_000), ("no_digest", 3_100), ("no_state", 3_200)):
        damage(checkpoint(storage, f"checkpoint_1{how}", mtime=t), how)
    (storage / "checkpoint_empty").mkdir()
    assert latest_checkpoint(run) == new
    damage(new, "truncated")
    assert latest_checkpoint(run) == mid
    damage(mid, "no_digest")
    assert latest_checkpoint(run) == old
    assert resolve_checkpoint(run) == old


def test_latest_checkpoint_prefers_the_summarys_intact_final(tmp_path: Path) -> None:
    run = tmp_path / "run"
    storage = run / "ray" / "selfclust-test"
    final = checkpoint(storage, "checkpoint_000001", mtime=1_000)
    newer = checkpoint(storage, "checkpoint_000002", mtime=2_000)
    write_summary(run, {"checkpoint": str(final)})
    assert latest_checkpoint(run) == final
    damage(final, "truncated")
    assert latest_checkpoint(run) == newer  # a damaged final: the newest complete one


def test_latest_checkpoint_searches_a_local_storage_path(tmp_path: Path) -> None:
    """ray.storage_path outside the run dir (recorded in run.json) is searched first."""
    run, elsewhere = tmp_path / "run", tmp_path / "storage"
    cfg = load_config(None, [f"ray.storage_path={elsewhere}"])
    run_identity(run, cfg)
    with pytest.raises(FileNotFoundError, match=str(elsewhere)):
        latest_checkpoint(run)
    inside = checkpoint(run / "ray" / "r", "checkpoint_000001", mtime=1_000)
    there = checkpoint(elsewhere / "r", "checkpoint_000002", mtime=2_000)
    assert latest_checkpoint(run) == there
    os.utime(inside / DIGEST_FILE, (3_000, 3_000))
    assert latest_checkpoint(run) == inside  # both roots, one order


def test_resolve_checkpoint(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path / "run" / "ray" / "r", "checkpoint_000001")
    assert resolve_checkpoint(ckpt) == ckpt  # a checkpoint dir, as given
    assert resolve_checkpoint(tmp_path / "run") == ckpt
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")


def test_default_paths(tmp_path: Path) -> None:
    assert default_run_dir("configs/quickstart.yaml") == Path("runs/quickstart")
    ckpt = checkpoint(tmp_path / "run" / "ray" / "r", "checkpoint_000001")
    assert default_output(tmp_path / "run", "probe.json") == tmp_path / "run" / "probe.json"
    assert default_output(ckpt, "probe.json") == Path("probe.json")  # never into a checkpoint


# ---------------------------------------------------------------- label changes


def test_label_changes_last_attempt_wins(tmp_path: Path) -> None:
    assert label_changes(tmp_path) == []  # no metrics.jsonl
    recs = [
        {"step": 0, "event": "init_kmeans", "label_change": 1.0},
        {"step": 5, "loss": 2.0},
        {"step": 20, "event": "relabel", "label_change": 0.4},
        {"step": 40, "event": "relabel", "label_change": 0.3},
        {"step": 30, "event": "resumed"},  # a restart from step 30 redoes the update at 40
        {"step": 40, "event": "relabel", "label_change": 0.25},
        {"step": 60, "event": "relabel", "label_change": 0.1},
    ]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert label_changes(tmp_path) == [
        {"step": 0, "event": "init_kmeans", "label_change": 1.0},
        {"step": 20, "event": "relabel", "label_change": 0.4},
        {"step": 40, "event": "relabel", "label_change": 0.25},
        {"step": 60, "event": "relabel", "label_change": 0.1},
    ]


def test_damaged_run_files_are_named_with_what_to_do(tmp_path: Path) -> None:
    """run.json, summary.json and config.yaml that do not parse (edited by hand, cut off by a
    full disk) are one UserError naming the file; a cut-off metrics line is skipped."""
    from selfclust.errors import UserError

    cfg = load_config(None, [])
    run_identity(tmp_path, cfg)
    (tmp_path / RUN_FILE).write_text('{"name": "selfclust-1", "wand')
    with pytest.raises(DamagedRunFile, match=r"run.json is not valid JSON .*new --run-dir"):
        run_identity(tmp_path, cfg)
    with pytest.raises(UserError, match="run.json"):
        read_identity(tmp_path)
    (tmp_path / RUN_FILE).write_text("[1, 2]")
    with pytest.raises(DamagedRunFile, match="holds a JSON list, not an object"):
        run_identity(tmp_path, cfg)
    run_identity(tmp_path / "b", cfg)
    (tmp_path / "b" / CONFIG_FILE).write_text("optim: [")
    with pytest.raises(DamagedRunFile, match="config.yaml is not a selfclust config"):
        read_identity(tmp_path / "b")
    (tmp_path / SUMMARY_FILE).write_text("{")
    with pytest.raises(DamagedRunFile, match="summary.json .* delete it"):
        finished_summary(tmp_path)
    with pytest.raises(DamagedRunFile, match="summary.json"):
        latest_checkpoint(tmp_path)
    lines = [{"step": 5, "event": "relabel", "label_change": 0.5}, {"step": 9, "label_change": 0.1}]
    text = "\n".join(json.dumps(r) for r in lines)
    (tmp_path / METRICS_FILE).write_text(text + '\n{"step": 12, "label_ch')  # a crash mid-line
    assert [r["step"] for r in label_changes(tmp_path)] == [5, 9]
