"""The files ``selfclust assign`` writes: the assignments (CSV or Parquet) and the skipped
images (CSV: quoted, so any file name survives)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any


def columns(rows: dict[str, Any], heads: list[int]) -> dict[str, Any]:
    """``key`` then ``cluster``/``probability`` for one head, or ``cluster_hT``/
    ``probability_hT`` for each head of several."""
    out: dict[str, Any] = {"key": rows["keys"]}
    for t in heads:
        tag = "" if len(heads) == 1 else f"_h{t}"
        out[f"cluster{tag}"] = rows["ids"][t]
        out[f"probability{tag}"] = rows["probs"][t]
    return out


def write_assignments(out: Path, rows: dict[str, Any], heads: list[int]) -> None:
    """Write through a temporary name and a rename: a cut-off run leaves no half file."""
    cols = columns(rows, heads)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".partial")
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(cols), part)
    else:
        text = {
            n: [f"{v:.6f}" for v in c.tolist()] if n.startswith("probability") else c
            for n, c in cols.items()
        }
        with open(part, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(text))
            w.writerows(zip(*text.values(), strict=True))
    os.replace(part, out)


def write_skipped(path: Path, skipped: list[tuple[str, str]]) -> str | None:
    """``key,reason`` per skipped image (None and no file when nothing was skipped; an old
    list from an earlier call is removed)."""
    if not skipped:
        path.unlink(missing_ok=True)
        return None
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "reason"])
        w.writerows(skipped)
    return str(path)
