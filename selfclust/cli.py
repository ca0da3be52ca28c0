"""The ``selfclust`` command line: the argument parser of shard, train, evaluate, probe,
export, assign and config, :func:`main`, which runs the chosen command and turns its errors
into exit code 2,
and :func:`cmd_train` (``selfclust train`` → :func:`selfclust.launch.train`); the other
commands are in :mod:`selfclust.commands`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from selfclust.commands import (
    cmd_assign,
    cmd_config,
    cmd_evaluate,
    cmd_export,
    cmd_probe,
    cmd_shard,
    pictures,
    print_heads,
)


def cmd_train(args: argparse.Namespace) -> int:
    from selfclust.config import load_config
    from selfclust.eval.pictures import GALLERY
    from selfclust.launch import train
    from selfclust.rundir import default_run_dir

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    summary = train(cfg, run_dir, verbose=args.verbose)
    print_heads(summary["heads"], summary.get("best_head"))
    acc, nmi = summary.get("acc"), summary.get("nmi")
    if acc is not None:
        print(
            f"ACC {acc:.4f}  NMI {nmi:.4f}  ARI {summary['ari']:.4f}  (head {summary['best_head']})"
        )
    print(f"summary: {run_dir / 'summary.json'}")
    if not (run_dir / GALLERY).is_file():  # drawn once, when the run ends
        pictures(run_dir)
    return 0


def _probe_workers(text: str) -> int | str:
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"takes 'auto' or a count >= 1, got {text!r}")


def _add_shard(sub: Any) -> None:
    s = sub.add_parser(
        "shard",
        help="write WebDataset shards + manifest.json from a dataset (or --verify a shard set)",
    )
    s.add_argument(
        "source",
        help="an .npz with x/y; an IDX images file (labels found beside it); an image-folder "
        "tree (class subfolders, any format Pillow reads); a file list (.txt/.csv/.tsv: "
        "path[,label] per line); torchvision:NAME[:SPLIT] with --root; or a built-in name "
        "(mnist_test). With --verify: a shard set (dir, http(s) URL, pipe:...{name}..., or a "
        "brace pattern)",
    )
    s.add_argument("out", nargs="?", help="output directory")
    s.add_argument("--shard-size", type=int, default=5000, help="max samples per shard")
    s.add_argument("--shard-bytes", help="max bytes per shard, e.g. 1GB, 500MB (default: none)")
    s.add_argument(
        "--encode",
        choices=["keep", "png", "jpeg"],
        default="keep",
        help="keep file bytes as they are (arrays: png), or re-encode as png / jpeg",
    )
    s.add_argument("--quality", type=int, default=95, help="JPEG quality for --encode jpeg")
    s.add_argument("--max-side", type=int, help="shrink images whose longer side exceeds this")
    s.add_argument("--workers", type=int, default=1, help="parallel decode/encode processes")
    s.add_argument(
        "--post",
        help="shell command run for each finished shard, then the manifest, with {path} and "
        "{name} filled in, e.g. 'aws s3 cp {path} s3://bucket/set/{name}'",
    )
    s.add_argument(
        "--no-keep-local", action="store_true", help="with --post: delete shards once uploaded"
    )
    s.add_argument("--root", help="torchvision:NAME sources: the folder the dataset is stored in")
    s.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image file (default: skip it and list it in "
        "OUT/skipped.txt)",
    )
    s.add_argument("--verify", action="store_true", help="re-read SOURCE shards and check them")
    s.add_argument("--decode", action="store_true", help="with --verify: decode every image too")
    s.add_argument(
        "--quick",
        action="store_true",
        help="with --verify: only check that every shard exists at its manifest's size "
        "(a stat, an HTTP HEAD or a pipe's first bytes; what `selfclust train` checks first)",
    )
    s.set_defaults(func=cmd_shard)


def _add_train(sub: Any) -> None:
    t = sub.add_parser("train", help="train (or resume) a run")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.1")
    t.add_argument("--run-dir", help="run directory (default runs/CONFIG_NAME); rerun to resume")
    t.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own output on the terminal (default: only in RUN_DIR/ray.log)",
    )
    t.set_defaults(func=cmd_train)


def _add_evaluate(sub: Any) -> None:
    e = sub.add_parser("evaluate", help="score each head against ground truth (NMI, ARI, ACC)")
    e.add_argument("target", help="a run dir or a checkpoint dir")
    e.add_argument("--data", help="shard dir to evaluate on (default: the run's eval data)")
    e.add_argument(
        "--out", help="JSON output (default RUN_DIR/evaluation.json, or ./evaluation.json)"
    )
    e.add_argument("--batch-size", type=int, default=512)
    e.add_argument(
        "--pictures", action="store_true", help="also (re)draw the run dir's PNGs (and log to W&B)"
    )
    e.set_defaults(func=cmd_evaluate)


def _add_probe(sub: Any) -> None:
    pr = sub.add_parser(
        "probe", help="linear probe per ResNet stage and weighted k-NN on frozen features"
    )
    pr.add_argument("target", help="a run dir or a checkpoint dir")
    pr.add_argument("--data", help="labelled shards to train the probes on (default: run's train)")
    pr.add_argument(
        "--eval-data",
        help="labelled shards to score on (default: a fixed stratified split of --data)",
    )
    pr.add_argument("--out", help="JSON output (default RUN_DIR/probe.json, or ./probe.json)")
    pr.add_argument("--epochs", type=int, default=30)
    pr.add_argument("--batch-size", type=int, default=256, help="global batch")
    pr.add_argument("--lr", type=float, default=0.1)
    pr.add_argument("--weight-decay", type=float, default=0.0)
    pr.add_argument("--schedule", choices=["cosine", "step"], default="cosine")
    pr.add_argument("--views", type=int, default=3, help="embeddings per sample: clean + crops")
    pr.add_argument("--crop-scale", type=float, default=0.6, help="crop area in [SCALE, 1]")
    pr.add_argument("--hflip", type=float, help="flip probability of the crops (default: run's)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--eval-fraction", type=float, default=0.2, help="of the stratified split")
    pr.add_argument("--knn-k", type=int, nargs="+", default=[20, 200])
    pr.add_argument("--knn-temperature", type=float, default=0.07)
    pr.add_argument("--image-size", type=int, help="resize images (default: the run's size)")
    pr.add_argument(
        "--workers",
        type=_probe_workers,
        default="auto",
        help="local ranks, each embedding its own shards (on cuda:RANK when CUDA exists); "
        "auto: the run's trainer.num_workers above 50,000 samples, else 1",
    )
    pr.set_defaults(func=cmd_probe)


def _add_export(sub: Any) -> None:
    x = sub.add_parser(
        "export", help="write the backbone and heads as a file other code loads (docs/export.md)"
    )
    x.add_argument("target", help="a run dir (its final checkpoint) or a checkpoint dir")
    x.add_argument("--out", help="the file to write (default RUN_DIR/export.pt, or ./export.pt)")
    x.set_defaults(func=cmd_export)


def _add_assign(sub: Any) -> None:
    a = sub.add_parser("assign", help="the cluster of every image of a shard set or image folder")
    a.add_argument("target", help="an export file, a run dir or a checkpoint dir")
    a.add_argument("--data", required=True, help="shards (as data.train) or a folder of images")
    a.add_argument("--out", required=True, help="a .csv or .parquet file to write")
    a.add_argument(
        "--heads", default="best", help="best (lowest training loss), all, or numbers: 0,2"
    )
    a.add_argument("--batch-size", type=int, default=256)
    a.add_argument("--image-size", type=int, help="resize images (default: the model's size)")
    a.add_argument(
        "--workers",
        type=_probe_workers,
        default="auto",
        help="local ranks, each taking every N-th shard or file (on cuda:RANK when CUDA "
        "exists); auto: one per GPU above 50,000 images, else 1",
    )
    a.set_defaults(func=cmd_assign)


def _add_config(sub: Any) -> None:
    from selfclust.config import METHODS
    from selfclust.config.doc import FORMATS

    c = sub.add_parser(
        "config", help="every config key with its type, default and description (docs/config.md)"
    )
    c.add_argument("--method", choices=METHODS, help="only the keys this method reads")
    c.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        help="text; markdown (docs/config.md); yaml: a complete commented config of the "
        "defaults that `selfclust train` accepts",
    )
    c.set_defaults(func=cmd_config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selfclust",
        description="Self-labelling (SeLa) at scale: shard data, train on Ray, evaluate.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        _add_shard,
        _add_train,
        _add_evaluate,
        _add_probe,
        _add_export,
        _add_assign,
        _add_config,
    ):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from selfclust.errors import UserError

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
    except (UserError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"selfclust {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
