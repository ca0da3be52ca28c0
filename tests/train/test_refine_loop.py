"""SeLa's refined heads in the real worker loop (one rank, in this process): label updates that
re-set the heads to k-means centres (method.relabel_heads=kmeans) and the final refit
(method.final_refine) on digits."""

import json
from pathlib import Path

import pytest

OVER = [
    "model.arch=small_resnet",
    "model.widths=[16,32]",
    "method.heads=1",
    "method.clusters=10",
    "method.init=kmeans_pixels",
    "method.relabels=3",
    "method.relabel_start=0.3",
    "augment.hflip=0",
    "augment.crop_scale=[0.5,1]",
    "optim.epochs=5",
    "optim.batch_size=64",
    "checkpoint.every_steps=0",
    "wandb.mode=disabled",
]


@pytest.mark.slow
def test_kmeans_heads_and_final_refit(digits_npz: Path, tmp_path: Path) -> None:
    from selfclust.shards.write import write_shards
    from tests.helpers.spawn import train_rank

    write_shards(digits_npz, tmp_path / "shards", shard_size=500)
    runs = {}
    for final in ("false", "true"):
        out = tmp_path / final
        over = [*OVER, "method.relabel_heads=kmeans", f"method.final_refine={final}"]
        runs[final] = train_rank(0, 1, str(tmp_path / "shards"), str(out), over, None)["summary"]
        lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
        updates = [json.loads(x) for x in lines if '"relabel"' in x]
        assert len(updates) == 3 and all("kmeans_objective" in u for u in updates)
    plain, refit = runs["false"], runs["true"]
    assert "final_refine" not in plain and refit["final_refine"] is True
    assert plain["model_digest"] != refit["model_digest"]  # the heads changed
    assert refit["acc"] >= plain["acc"] - 0.01, (plain["acc"], refit["acc"])
