"""Open user images safely as RGB, and decode a list of them once with counted skips."""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

# Pillow's own guard against decompression bombs (about 179 MP); larger images are refused.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


class UnreadableImage(Exception):
    """An image that cannot be decoded; ``str()`` is the reason, for skip listings."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode (palette, grayscale, 16-bit, RGBA, CMYK) to 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def load_rgb(source: str | Path | Image.Image | Any) -> Image.Image:
    """Open a path or bytes (or take a PIL image, or call ``source.open()``), apply EXIF orientation, return RGB.

    Raises :class:`UnreadableImage` with a short reason when it cannot be decoded.
    """
    try:
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        elif not isinstance(source, (str, Path, Image.Image, io.IOBase)):
            source = source.open()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                return _to_rgb(ImageOps.exif_transpose(source))
            with Image.open(source) as opened:
                opened.load()
                return _to_rgb(ImageOps.exif_transpose(opened))
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except IsADirectoryError:
        raise UnreadableImage("is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage(f"larger than the {MAX_IMAGE_PIXELS} pixel limit (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise UnreadableImage("not a readable image (unknown format or empty file)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UnreadableImage(f"cannot decode: {err}") from None


@dataclass
class DecodeResult:
    """Decoded items (in input order, unreadable ones left out) and the skip list."""

    items: list[Any]
    kept: list[int]
    skipped: list[dict[str, str]]


def decode_all(
    sources: Sequence[Any],
    prepare: Callable[[Image.Image, Any], Any],
    name_of: Callable[[Any], str] = str,
    opener: Callable[[Any], Image.Image] = load_rgb,
    threads: int = 4,
) -> DecodeResult:
    """Open every source once, run ``prepare(image, source)`` on it, and count the unreadable ones.

    ``prepare`` turns the RGB image into what is kept in memory (e.g. resized pixels),
    so that training epochs never decode files again.
    """

    def work(source):
        try:
            return prepare(opener(source), source), None
        except UnreadableImage as err:
            return None, str(err)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(work, sources))
    items, kept, skipped = [], [], []
    for index, (source, (item, reason)) in enumerate(zip(sources, results)):
        if reason is None:
            items.append(item)
            kept.append(index)
        else:
            skipped.append({"file": name_of(source), "reason": reason})
    return DecodeResult(items, kept, skipped)


def decode_records(records: Sequence[Any], prepare: Callable[[Image.Image, Any], Any]) -> DecodeResult:
    """:func:`decode_all` for annotation records that name their file in ``record.image``."""
    return decode_all(records, prepare, name_of=lambda record: record.image, opener=lambda record: load_rgb(record.image))
