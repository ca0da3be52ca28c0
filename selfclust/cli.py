"""The ``selfclust`` command: shard, train, evaluate, probe, config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _write_json(path: Path, obj: Any) -> None:
    from selfclust.rundir import write_json

    write_json(path, obj)


def cmd_shard(args: argparse.Namespace) -> int:
    from selfclust.shards.upload import UploadError
    from selfclust.shards.verify import verify_shards
    from selfclust.shards.write import parse_bytes, write_shards

    if args.verify:
        report = verify_shards(args.source, decode=args.decode)
        what = "checksum, index and image" if args.decode else "checksum and index"
        print(
            f"{args.source}: {report['num_samples']} samples in {report['shards']} shards, "
            f"every {what} verified"
        )
        return 0
    if args.out is None:
        raise SystemExit("selfclust shard: OUT is required (or use --verify SPEC)")
    try:
        manifest = write_shards(
            args.source,
            args.out,
            shard_size=args.shard_size,
            shard_bytes=parse_bytes(args.shard_bytes) if args.shard_bytes else None,
            encode=args.encode,
            quality=args.quality,
            max_side=args.max_side,
            workers=args.workers,
            post=args.post,
            keep_local=not args.no_keep_local,
            root=args.root,
        )
    except UploadError as e:
        raise ValueError(str(e)) from e
    print(
        f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to "
        f"{args.out} (manifest.json)"
    )
    return 0


def _print_table(heads: list[dict[str, Any]], best: int | None, k_is_classes: bool = True) -> None:
    cols = ["acc", "nmi", "ari", "size_min", "size_max"]
    if not k_is_classes:  # K != classes: majority-vote accuracy and adjusted MI are the fair ones
        cols[3:3] = ["majority_acc", "ami"]
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
    from selfclust.eval.pictures import GALLERY
    from selfclust.launch import train

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
    if not (run_dir / GALLERY).is_file():  # drawn once, when the run ends
        _pictures(run_dir)
    return 0


def _pictures(run_dir: Path, data: str | None = None) -> None:
    """Gallery, cluster sizes and confusion matrix PNGs into the run dir (and W&B)."""
    from selfclust.eval.pictures import run_pictures

    done = run_pictures(run_dir, data=data)
    print(f"pictures: {', '.join(done['paths'].values())} ({done['wandb']})")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from selfclust.eval.evaluate import evaluate
    from selfclust.rundir import is_checkpoint_dir

    result = evaluate(args.target, data=args.data, batch_size=args.batch_size)
    _print_table(result["heads"], result.get("best_head"), result.get("k_equals_classes", True))
    agree = result["head_agreement"]
    if agree["pairs"]:
        print(
            f"agreement between heads: NMI mean {agree['nmi_mean']:.4f} min {agree['nmi_min']:.4f}"
        )
    out = Path(args.out) if args.out else result["default_out"]
    result.pop("default_out")
    _write_json(out, result)
    print(f"wrote {out}")
    if args.pictures:
        if is_checkpoint_dir(Path(args.target)):
            raise ValueError("--pictures needs a run dir (pictures are written into it)")
        _pictures(Path(args.target), args.data)
    return 0


def _probe_workers(text: str) -> int | str:
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"takes 'auto' or a count >= 1, got {text!r}")


def cmd_probe(args: argparse.Namespace) -> int:
    from selfclust.eval.probe import ProbeConfig
    from selfclust.eval.probe_launch import run_probe
    from selfclust.rundir import is_checkpoint_dir

    cfg = ProbeConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        views=args.views,
        crop_scale=args.crop_scale,
        hflip=args.hflip,
        seed=args.seed,
        eval_fraction=args.eval_fraction,
        knn_k=tuple(args.knn_k),
        knn_temperature=args.knn_temperature,
    )
    result = run_probe(
        args.target,
        args.data,
        args.eval_data,
        cfg,
        workers=args.workers,
        image_size=args.image_size,
    )
    print(f"ranks: {result['world_size']} on {result['device']} ({result['workers']['rule']})")
    print(f"split: {result['split']}  ({result['num_train']} train / {result['num_eval']} eval)")
    print(f"{'linear probe':<14}{'dim':>6}{'top-1':>9}{'top-5':>9}")
    for stage, r in result["linear"].items():
        print(f"{stage:<14}{r['dim']:>6}{r['top1']:>9.4f}{r['top5']:>9.4f}")
    for k, r in result["knn"].items():
        name = f"k-NN {k}"
        print(f"{name:<14}{'':>6}{r['top1']:>9.4f}{r['top5']:>9.4f}")
    target = Path(args.target)
    default = Path("probe.json") if is_checkpoint_dir(target) else target / "probe.json"
    out = Path(args.out) if args.out else default
    _write_json(out, result)
    print(f"wrote {out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from selfclust.config.doc import render

    sys.stdout.write(render(args.format, args.method))
    return 0


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
    s.add_argument("--verify", action="store_true", help="re-read SOURCE shards and check them")
    s.add_argument("--decode", action="store_true", help="with --verify: decode every image too")
    s.set_defaults(func=cmd_shard)


def _add_train(sub: Any) -> None:
    t = sub.add_parser("train", help="train (or resume) a run")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.1")
    t.add_argument("--run-dir", help="run directory (default runs/CONFIG_NAME); rerun to resume")
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
    for add in (_add_shard, _add_train, _add_evaluate, _add_probe, _add_config):
        add(sub)
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
