"""Open user images safely as RGB, and decode a list of them once with counted skips."""

from __future__ import annotations

import io
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Sequence, cast

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from visionlora.data.cache import (
    MISSING,
    CachePlan,
    CacheReport,
    DiskImages,
    LazyImages,
    RamImages,
    StoredImages,
    entry_meta,
    entry_path,
    read_meta,
    read_skip,
    source_key,
    write_entry,
    write_skip,
)

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


def load_rgb(source: str | Path | Image.Image | Any, max_pixels: int | None = None) -> Image.Image:
    """Open a path or bytes (or take a PIL image, or call ``source.open()``), apply EXIF orientation, return RGB.

    The first frame of an animated image is taken. Raises :class:`UnreadableImage` with a short
    reason when it cannot be decoded, or when its header claims more than ``max_pixels`` pixels:
    that check comes before the pixels are decoded, so a small file claiming a huge image costs
    no memory. (Pillow's own guard refuses images over ``Image.MAX_IMAGE_PIXELS`` as it opens
    them; a ``max_pixels`` above it needs that raised too.)
    """
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise UnreadableImage("empty: no image bytes")
            source = io.BytesIO(source)
        elif not isinstance(source, (str, Path, Image.Image, io.IOBase)):
            source = source.open()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                return _to_rgb(ImageOps.exif_transpose(source))
            # by here a path, or a binary file object (bytes wrapped, or what source.open() gave)
            with Image.open(cast("str | Path | IO[bytes]", source)) as opened:
                _check_pixels(opened, max_pixels)
                opened.load()
                return _to_rgb(ImageOps.exif_transpose(opened))
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except IsADirectoryError:
        raise UnreadableImage("is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's guard, as it opens the file
        if max_pixels is not None and max_pixels <= (Image.MAX_IMAGE_PIXELS or max_pixels):
            raise UnreadableImage(f"over the pixel limit of {max_pixels} (checked before decoding)") from None
        raise UnreadableImage(f"larger than the {MAX_IMAGE_PIXELS} pixel limit (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise UnreadableImage("not a readable image (unknown format or empty file)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UnreadableImage(f"cannot decode: {err}") from None


def _check_pixels(opened: Image.Image, max_pixels: int | None) -> None:
    """Refuse an image whose header (read by ``Image.open``, nothing decoded yet) claims over ``max_pixels``."""
    width, height = opened.size
    if max_pixels is not None and width * height > max_pixels:
        raise UnreadableImage(f"{width} x {height} pixels is over the pixel limit of {max_pixels} "
                              "(checked before decoding)")


# ("ok", prepared item or its meta, cache entry, reused) or ("skipped", reason, cache entry, reused)
Outcome = tuple[str, Any, Path | None, bool]


@dataclass
class DecodeResult:
    """Prepared items (in input order, unreadable ones left out), their indices, the skips,
    and what the cache did."""

    items: StoredImages
    kept: list[int]
    skipped: list[dict[str, str]]
    report: CacheReport


def decode_all(
    sources: Sequence[Any],
    prepare: Callable[[Image.Image, Any], Any],
    name_of: Callable[[Any], str] = str,
    opener: Callable[[Any], Image.Image] = load_rgb,
    threads: int = 4,
    cache: CachePlan | None = None,
    settings: str = "",
) -> DecodeResult:
    """Open every source once, run ``prepare(image, source)`` on it, and count the unreadable ones.

    ``prepare`` turns the RGB image into what training reads (e.g. resized pixels). Where it
    is kept follows ``cache`` (RAM by default; see :mod:`visionlora.data.cache`); ``settings``
    names everything besides the source that the prepared image depends on, for the disk cache.
    """
    plan = cache or CachePlan()
    disk_folder = plan.folder if plan.mode == "disk" else None
    if plan.mode == "disk" and disk_folder is None:
        raise ValueError("a disk cache plan needs a folder")
    started = time.perf_counter()

    def make(source: Any) -> Any:
        return prepare(opener(source), source)

    def work(source: Any) -> Outcome:
        path = None
        if disk_folder is not None:
            key = source_key(source, settings)
            path = entry_path(disk_folder, key) if key else None
            reused = _reuse(path) if path else None
            if reused is not None:
                return reused
        try:
            item = make(source)
        except UnreadableImage as err:
            if path is not None:
                write_skip(path, str(err))
            return "skipped", str(err), path, False
        if path is not None:
            write_entry(path, item)
        return "ok", item if plan.mode == "ram" else entry_meta(item), path, False

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(work, sources))
    report = CacheReport(plan.mode, str(plan.folder) if plan.mode == "disk" else None)
    items, kept, skipped, paths = _sorted_outcomes(sources, results, name_of, report)
    store = _store(plan, items, paths, [sources[i] for i in kept], make, report)
    report.decode_seconds = round(time.perf_counter() - started, 3)
    return DecodeResult(store, kept, skipped, report)


def _sorted_outcomes(sources: Sequence[Any], results: list[Outcome], name_of: Callable[[Any], str],
                     report: CacheReport) -> tuple[list[Any], list[int], list[dict[str, str]], list[Path | None]]:
    """(items, their source indices, skipped files, cache entries) from each source's outcome, counted in ``report``."""
    items: list[Any] = []
    kept: list[int] = []
    skipped: list[dict[str, str]] = []
    paths: list[Path | None] = []
    for index, (source, (status, value, path, reused)) in enumerate(zip(sources, results)):
        report.reused += reused
        report.decoded += not reused
        if status == "skipped":
            skipped.append({"file": name_of(source), "reason": value})
            continue
        items.append(value)
        kept.append(index)
        paths.append(path)
    return items, kept, skipped, paths


def _store(plan: CachePlan, items: list[Any], paths: list[Path | None], kept_sources: list[Any],
           make: Callable[[Any], Any], report: CacheReport) -> StoredImages:
    """Where the prepared images are kept, as the plan says; their bytes counted in ``report``."""
    entries = [p for p in paths if p is not None]
    if plan.mode == "disk" and len(entries) == len(paths):
        report.bytes = sum(p.stat().st_size for p in entries if p.is_file())
        return DiskImages(items, entries, kept_sources, make)
    if plan.mode == "none":
        return LazyImages(items, kept_sources, make)
    store = RamImages(items if plan.mode == "ram" else [make(s) for s in kept_sources])
    report.bytes = sum(_nbytes(item) for item in store)
    return store


def _reuse(path: Path) -> Outcome | None:
    """("ok", meta, path, True) for a usable cache entry, ("skipped", reason, ...) for a known-bad image."""
    skip = read_skip(path)
    if skip is not None:
        return "skipped", skip, path, True
    meta = read_meta(path)
    return ("ok", meta, path, True) if meta is not MISSING else None


def _nbytes(item: Any) -> int:
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.nbytes
    if isinstance(item, dict):
        return sum(_nbytes(v) for v in item.values())
    if isinstance(item, (list, tuple)):
        return sum(_nbytes(v) for v in item)
    if hasattr(item, "__dataclass_fields__"):
        return sum(_nbytes(getattr(item, name)) for name in item.__dataclass_fields__)
    return 0


def decode_records(records: Sequence[Any], prepare: Callable[[Image.Image, Any], Any],
                   cache: CachePlan | None = None, settings: str = "") -> DecodeResult:
    """:func:`decode_all` for annotation records that name their file in ``record.image``."""
    return decode_all(records, prepare, name_of=lambda record: record.image,
                      opener=lambda record: load_rgb(record.image), cache=cache, settings=settings)
