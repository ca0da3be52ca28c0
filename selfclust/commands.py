"""What the ``selfclust`` subcommands other than ``train`` do with their parsed arguments,
and the printing they share with it.

:mod:`selfclust.cli` parses the command line and calls one ``cmd_*`` (``cmd_train`` is in
:mod:`selfclust.cli` itself); each calls the module that does the work and prints its
result. A ``ValueError`` (or ``ConfigError``, ``FileNotFoundError``, ``FileExistsError``)
raised here becomes exit code 2 in :func:`selfclust.cli.main`. Heavy imports (torch, Ray)
stay inside the commands, so that ``selfclust --help`` starts fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def cmd_shard(args: argparse.Namespace) -> int:
    from selfclust.shards.skipped import SKIPPED
    from selfclust.shards.upload import UploadError
    from selfclust.shards.verify import verify_quick, verify_shards
    from selfclust.shards.write import parse_bytes, write_shards

    if args.verify and args.quick:
        if args.decode:
            raise ValueError("--quick reads no image: use --verify --decode, or --verify --quick")
        quick = verify_quick(args.source)
        what = (
            "at the size its manifest records"
            if quick["sized"] == quick["shards"]
            else (f"present ({quick['sized']} checked against the manifest's size)")
        )
        print(f"{args.source}: {quick['num_samples']} samples in {quick['shards']} shards, "
              f"every shard {what}")  # fmt: skip
        return 0
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
            strict=args.strict,
        )
    except UploadError as e:
        raise ValueError(str(e)) from e
    line = (
        f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to "
        f"{args.out} (manifest.json)"
    )
    n = manifest["skipped"]
    if n:
        files = "file" if n == 1 else "files"
        line += f"; skipped {n} unreadable {files}, listed in {Path(args.out) / SKIPPED}"
    print(line)
    return 0


def print_heads(heads: list[dict[str, Any]], best: int | None, k_is_classes: bool = True) -> None:
    """One row of scores per head, the best one (lowest training loss) marked."""
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


def pictures(run_dir: Path, data: str | None = None) -> None:
    """Gallery, cluster sizes and confusion matrix PNGs into the run dir (and W&B)."""
    from selfclust.eval.pictures import run_pictures

    done = run_pictures(run_dir, data=data)
    print(f"pictures: {', '.join(done['paths'].values())} ({done['wandb']})")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from selfclust.eval.evaluate import evaluate
    from selfclust.rundir import is_checkpoint_dir, write_json

    result = evaluate(args.target, data=args.data, batch_size=args.batch_size)
    print_heads(result["heads"], result.get("best_head"), result.get("k_equals_classes", True))
    agree = result["head_agreement"]
    if agree["pairs"]:
        print(
            f"agreement between heads: NMI mean {agree['nmi_mean']:.4f} min {agree['nmi_min']:.4f}"
        )
    out = Path(args.out) if args.out else result["default_out"]
    result.pop("default_out")
    write_json(out, result)
    print(f"wrote {out}")
    if args.pictures:
        if is_checkpoint_dir(Path(args.target)):
            raise ValueError("--pictures needs a run dir (pictures are written into it)")
        pictures(Path(args.target), args.data)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from selfclust.eval.probe import ProbeConfig
    from selfclust.eval.probe_launch import run_probe
    from selfclust.rundir import default_output, write_json

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
    out = Path(args.out) if args.out else default_output(Path(args.target), "probe.json")
    write_json(out, result)
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from selfclust.export import write_export
    from selfclust.rundir import default_output

    out = Path(args.out) if args.out else default_output(Path(args.target), "export.pt")
    export = write_export(args.target, out)
    ident = export["identity"]
    heads = len(export["heads"]["weight"]) if "heads" in export else 1
    print(
        f"wrote {out}: {export['method']} {export['arch']} backbone + {heads} head(s) "
        f"(best {export['best_head']}), step {ident['position'].get('global_step')} of "
        f"{ident['run_name'] or ident['checkpoint']}; load it with selfclust.load_model"
    )
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    from selfclust.assign import assign

    done = assign(
        args.target,
        args.data,
        args.out,
        heads=args.heads,
        batch_size=args.batch_size,
        workers=args.workers,
        image_size=args.image_size,
    )
    heads = ", ".join(str(h) for h in done["heads"])
    line = (
        f"assigned {done['assigned']:,} images (head {heads}; {done['clusters_used']} clusters "
        f"used) on {done['ranks']} rank(s) into {done['out']}"
    )
    if done["skipped"]:
        line += f"; skipped {done['skipped']} unreadable, listed in {done['skipped_file']}"
    if done["ignored"]:
        line += f"; ignored {done['ignored']} files that are not images by their extension"
    print(line)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from selfclust.config.doc import render

    sys.stdout.write(render(args.format, args.method))
    return 0
