"""The ``selfclust`` command: shard, train, evaluate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _write_json(path: Path, obj: Any) -> None:
    from selfclust.launcher import _atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(obj, indent=2))


def cmd_shard(args: argparse.Namespace) -> int:
    from selfclust.shards import verify_shards, write_shards

    if args.verify:
        verify_shards(args.source)
        print(f"{args.source}: every shard, checksum and index verified")
        return 0
    if args.out is None:
        raise SystemExit("selfclust shard: OUT is required (or use --verify DIR)")
    manifest = write_shards(args.source, args.out, shard_size=args.shard_size)
    print(
        f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to "
        f"{args.out} (manifest.json)"
    )
    return 0


def _print_table(heads: list[dict[str, Any]], best: int | None) -> None:
    cols = ["acc", "nmi", "ari", "size_min", "size_max"]
    print("head  " + "  ".join(f"{c:>8}" for c in cols))
    for h in heads:
        cells = []
        for c in cols:
            v = h.get(c)
            cells.append(f"{v:8.4f}" if isinstance(v, float) else f"{v!s:>8}")
        mark = "  <- best (lowest training loss)" if h["head"] == best else ""
        print(f"{h['head']:>4}  " + "  ".join(cells) + mark)


def cmd_train(args: argparse.Namespace) -> int:
    from selfclust.config import load_config
    from selfclust.launcher import train

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    summary = train(cfg, run_dir)
    _print_table(summary["heads"], summary.get("best_head"))
    acc, nmi = summary.get("acc"), summary.get("nmi")
    if acc is not None:
        print(
            f"ACC {acc:.4f}  NMI {nmi:.4f}  ARI {summary['ari']:.4f}  (head {summary['best_head']})"
        )
    print(f"summary: {run_dir / 'summary.json'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from selfclust.evaluate import evaluate

    result = evaluate(args.target, data=args.data, batch_size=args.batch_size)
    _print_table(result["heads"], result.get("best_head"))
    out = Path(args.out) if args.out else result["default_out"]
    result.pop("default_out")
    _write_json(out, result)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selfclust",
        description="Self-labelling (SeLa) at scale: shard data, train on Ray, evaluate.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("shard", help="write WebDataset shards + manifest.json from a dataset")
    s.add_argument(
        "source",
        help="an .npz with x/y, an MNIST IDX images .gz (labels found beside it), an image-folder "
        "tree (class subfolders), or a built-in name (mnist_test); with --verify, a shard dir",
    )
    s.add_argument("out", nargs="?", help="output directory")
    s.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    s.add_argument("--verify", action="store_true", help="re-read SOURCE shards and check them")
    s.set_defaults(func=cmd_shard)

    t = sub.add_parser("train", help="train (or resume) a run")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.1")
    t.add_argument("--run-dir", help="run directory (default runs/CONFIG_NAME); rerun to resume")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="score each head against ground truth (NMI, ARI, ACC)")
    e.add_argument("target", help="a run dir or a checkpoint dir")
    e.add_argument("--data", help="shard dir to evaluate on (default: the run's eval data)")
    e.add_argument(
        "--out", help="JSON output (default RUN_DIR/evaluation.json, or ./evaluation.json)"
    )
    e.add_argument("--batch-size", type=int, default=512)
    e.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    from selfclust.config import ConfigError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after --run-dir; anything else is an error.
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad or (extra and args.command != "train"):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return int(args.func(args))
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"selfclust {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
