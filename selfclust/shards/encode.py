"""Encode the images of ``selfclust shard``: one source item → one shard sample's image field.

``max_side`` shrinks large images (aspect kept); ``encode`` keeps file bytes as they are or
re-encodes them (PNG, or JPEG at ``quality``); arrays are written as ``array_format``.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

from selfclust.shards.source import UnreadableFile

# Pillow modes that stay one channel; every other mode is converted to RGB.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
ENCODINGS = ("keep", "png", "jpeg")
ARRAY_FORMATS = ("png", "jpg")
_BAD_IMAGE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


def channels_for_mode(mode: str) -> int:
    """Channels a Pillow image of ``mode`` decodes to in selfclust: 1 (grayscale) or 3 (RGB)."""
    return 1 if mode in GRAY_MODES else 3


def _refused(raw: tuple, reason: str, message: str | None = None) -> ValueError:
    """The error for an item that cannot be encoded: an :class:`UnreadableFile` (which the
    writer skips and lists) for file bytes, a plain ValueError for arrays (never skipped)."""
    if raw[0] == "bytes":
        return UnreadableFile(raw[3], reason, message)
    return ValueError(message or f"unreadable array image: {reason}")


def encode_item(raw: tuple, opts: dict[str, Any]) -> tuple[str, bytes, tuple[int, int, int]]:
    """One source item → (image field, bytes, (h, w, channels)), re-encoded/resized as asked.

    File bytes are decoded fully even when kept (``im.load()``, or the resize that loads), so
    a broken or truncated file fails here, not in training: an empty, truncated or non-image
    file, or a decompression bomb (refused before decoding), raises :class:`UnreadableFile`.
    """
    where = raw[3] if raw[0] == "bytes" else "an array image"
    if raw[0] == "bytes" and not raw[2]:
        raise UnreadableFile(where, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im: Image.Image
            if raw[0] == "bytes":
                im = Image.open(io.BytesIO(raw[2]))
                src_format = im.format
            else:
                im = Image.fromarray(raw[1]) if raw[0] == "array" else raw[1]
                src_format = None
            side = opts["max_side"]
            if side and max(im.size) > side:
                im.thumbnail((side, side), Image.Resampling.BICUBIC)  # JPEG: DCT-scaled decode
                resized = True
            else:
                im.load()
                resized = False
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _refused(
            raw,
            f"decompression bomb, not decoded: {e}",
            f"refused image file {where}: {e}; it is a decompression bomb (or needs "
            "PIL.Image.MAX_IMAGE_PIXELS raised)",
        ) from e
    except _BAD_IMAGE as e:
        # Pillow's own message names the BytesIO object (an address): say what it means.
        unknown = isinstance(e, UnidentifiedImageError)
        raise _refused(raw, "not an image Pillow can read" if unknown else str(e)) from e
    channels = channels_for_mode(im.mode)
    encode = opts["encode"]
    if raw[0] == "bytes" and encode == "keep" and not resized:
        return raw[1], raw[2], (im.height, im.width, channels)
    if encode == "keep":  # arrays: the array format; resized files: their own kind
        fmt = (
            opts["array_format"]
            if raw[0] != "bytes"
            else ("jpg" if src_format == "JPEG" else "png")
        )
    else:
        fmt = "jpg" if encode == "jpeg" else "png"
    im = im.convert("L" if channels == 1 else "RGB") if im.mode not in ("L", "RGB") else im
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=opts["quality"])
    else:
        im.save(buf, format="PNG")
    return fmt, buf.getvalue(), (im.height, im.width, channels)
