"""SOURCE readers of image files: an image-folder directory, and a file list.

Files are kept as they are (their bytes go into the shards unless re-encoding is asked for);
any format Pillow can open is accepted. Files are read (and a listed file found missing) only
when written, so listing a million files costs no reads.
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from selfclust.shards.source import Source, files_source


def readable_extensions() -> dict[str, str]:
    """File extension ('.jpg') → Pillow format, for the formats Pillow can open."""
    Image.init()
    return {ext: f for ext, f in Image.registered_extensions().items() if f in Image.OPEN}


def folder_source(root: Path) -> Source:
    """``root/CLASS/**/image`` (classes: the subfolder names, sorted), or only top-level
    images for an unlabelled set; hidden files and folders are left out."""
    exts = readable_extensions()

    def images_under(d: Path) -> list[Path]:
        return sorted(
            p
            for p in d.rglob("*")
            if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")
        )

    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    top = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in exts]
    if subdirs and top:
        raise ValueError(
            f"{root} mixes image files ({top[0].name}, ...) with class subfolders; put every "
            "image in a class subfolder (or use only top-level images for an unlabelled set)"
        )
    files: list[tuple[Path, int | None]]
    if subdirs:
        classes: list[str] | None = [d.name for d in subdirs]
        files = [(p, c) for c, d in enumerate(subdirs) for p in images_under(d)]
    else:
        classes = None
        files = [(p, None) for p in images_under(root)]
    if not files:
        raise ValueError(
            f"no image files found under {root}; expected class subfolders holding images "
            f"readable by Pillow (e.g. {', '.join(sorted(exts)[:8])}, ...)"
        )
    info = {"kind": "imagefolder", "path": str(root)}
    return files_source(files, classes, f"imagefolder:{root}", info)


def list_source(path: Path) -> Source:
    """``path[,label]`` per line (comma or tab); relative paths are relative to the list file.
    Integer labels are class ids; any other labels are class names (sorted)."""
    delimiter = "\t" if path.suffix == ".tsv" else ","
    rows: list[tuple[Path, str | None]] = []
    listed_at: list[str] = []
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter=delimiter), 1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) > 2:
                raise ValueError(f"{path}:{line_no}: expected 'path[,label]', got {row!r}")
            file = Path(row[0].strip())
            file = file if file.is_absolute() else path.parent / file
            label = row[1].strip() if len(row) == 2 and row[1].strip() else None
            rows.append((file, label))
            listed_at.append(f"{path}:{line_no}")
    if not rows:
        raise ValueError(f"{path} lists no image files; expected 'path[,label]' per line")
    labels = {lab for _, lab in rows if lab is not None}
    classes: list[str] | None = None
    if all(lab.lstrip("-").isdigit() for lab in labels):
        files = [(p, None if lab is None or int(lab) < 0 else int(lab)) for p, lab in rows]
    else:
        classes = sorted(labels)
        index = {c: k for k, c in enumerate(classes)}
        files = [(p, None if lab is None else index[lab]) for p, lab in rows]
    info = {"kind": "filelist", "path": str(path)}
    return files_source(files, classes, f"filelist:{path}", info, listed_at)
