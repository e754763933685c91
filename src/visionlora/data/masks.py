"""Semantic segmentation masks, shared by the mask readers: records, mask loading, class lists.

A :class:`SegmentationRecord` is one image and its mask; :func:`load_mask` reads the mask as
class ids, whatever kept it: a mask file, a :class:`ColourMask`, a lazy Hugging Face row or a
:class:`~visionlora.data.coco_masks.CocoMask` to draw. A mask's pixel values are class ids (a
palette PNG's indices, a grayscale PNG's values); :data:`IGNORE_INDEX` (255, VOC's object
borders) marks pixels that count for nothing.

The readers, each its own module, are listed in the order they are tried in
``visionlora.data.formats.SEGMENTATION_FORMATS``: Pascal VOC (``voc_segmentation``), image and
mask folders (``mask_folders``), Hugging Face datasets (``hf_segmentation``) and COCO polygons or
RLE (``coco_segmentation``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from visionlora.data.coco_masks import CocoMask, rasterise
from visionlora.data.images import MAX_IMAGE_PIXELS, is_image_file
from visionlora.data.splits import TEST_DIRS, TRAIN_DIRS, VAL_DIRS
from visionlora.errors import VisionLoraError

IGNORE_INDEX = 255
VOC_BORDER_COLOUR = (224, 224, 192)  # index 255 of the VOC palette
SINGLE_CHANNEL_MODES = ("P", "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N")


@dataclass
class SegmentationRecord:
    """One image and its mask.

    ``image`` is a path, or a lazy reference with ``.open()`` (a Hugging Face dataset row);
    ``mask`` is what :func:`load_mask` reads: a mask file path, a :class:`ColourMask`, a lazy
    reference, or a :class:`~visionlora.data.coco_masks.CocoMask` to draw.
    """

    image: Any
    mask: Any
    source: str = ""  # the annotation file (and record) it came from, for messages


@dataclass(frozen=True)
class ColourMask:
    """A mask file whose RGB colours (if it is saved in colour) map to class ids through ``colours``."""

    path: str
    colours: tuple[tuple[int, int, int], ...]

    def __str__(self) -> str:
        return self.path

    def __fspath__(self) -> str:
        return self.path


def palette_image(mask: np.ndarray, colours: Sequence[Sequence[int]]) -> Image.Image:
    """An (H, W) class-id mask as a palette ("P") image: pixel values are class ids, shown in ``colours``."""
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    image.putpalette([int(value) for colour in list(colours)[:256] for value in colour])
    return image


def voc_palette(count: int = 256) -> list[tuple[int, int, int]]:
    """The Pascal VOC colour map: colour ``i`` of the palette PNGs (0 black, 1 dark red, ...)."""
    palette = []
    for index in range(count):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette.append((red, green, blue))
    return palette


# -- masks -------------------------------------------------------------------------------------
def load_mask(record: SegmentationRecord, num_classes: int, ignore_index: int = IGNORE_INDEX,
              image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The record's mask as an (H, W) uint8 array of class ids (0 to num_classes - 1) and ``ignore_index``.

    ``image_size`` is the decoded image's (width, height); when given, the mask must match it.
    Raises :class:`VisionLoraError` naming the file for a missing or unreadable mask, a size
    that differs from the image's, a colour mask without a colour table, or an unknown class id.
    """
    if not 0 < num_classes <= 255 or not 0 <= ignore_index <= 255:
        raise VisionLoraError(f"{num_classes} classes with ignore value {ignore_index} do not fit an 8-bit mask "
                              "(at most 255 classes, ignore value 0-255)")
    mask = record.mask
    if isinstance(mask, CocoMask):
        if image_size is not None and mask.width is not None and (mask.width, mask.height) != tuple(image_size):
            raise VisionLoraError(f"{mask.where}: the COCO file gives the image as {mask.width}x{mask.height} "
                                  f"pixels but {record.image} is {image_size[0]}x{image_size[1]}")
        ids = rasterise(mask, ignore_index, image_size)
    else:
        name = mask_name(record)
        image = _open_mask(mask, name)
        if image_size is not None and image.size != tuple(image_size):
            raise VisionLoraError(f"{name}: mask is {image.size[0]}x{image.size[1]} pixels but its image "
                                  f"{record.image} is {image_size[0]}x{image_size[1]}")
        ids = _class_ids(image, mask.colours if isinstance(mask, ColourMask) else None, name, ignore_index)
    return _checked(ids, num_classes, ignore_index, mask_name(record))


def mask_name(record: SegmentationRecord) -> str:
    """How messages name a record's mask: its file, else the record it came from."""
    if isinstance(record.mask, (str, Path, ColourMask)):
        return str(record.mask)
    return record.source or str(record.mask)


def _open_mask(mask: Any, name: str) -> Image.Image:
    if isinstance(mask, (str, Path, ColourMask)):
        path = Path(str(mask))
        if not path.is_file():
            raise VisionLoraError(f"{name}: mask file not found")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as opened:
                    opened.load()
                    return opened
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise VisionLoraError(f"{name}: mask larger than the {MAX_IMAGE_PIXELS} pixel limit") from None
        except UnidentifiedImageError:
            raise VisionLoraError(f"{name}: not a readable mask image (unknown format or empty file)") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise VisionLoraError(f"{name}: cannot decode the mask: {err}") from None
    try:
        image = mask.open()
    except Exception as err:  # the datasets library raises many types; name the source instead
        reason = str(err).splitlines()[0] if str(err) else repr(err)
        raise VisionLoraError(f"{name}: cannot read the mask: {reason}") from None
    if image is None:
        raise VisionLoraError(f"{name}: no mask (the annotation is empty)")
    if not isinstance(image, Image.Image):
        raise VisionLoraError(f"{name}: the annotation is a {type(image).__name__}, not a mask image")
    return image


def _class_ids(image: Image.Image, colours: tuple | None, name: str, ignore_index: int) -> np.ndarray:
    if image.mode in SINGLE_CHANNEL_MODES:
        return np.asarray(image).astype(np.int64)
    if image.mode in ("RGB", "RGBA") and colours:
        return _map_colours(np.asarray(image.convert("RGB")), colours, name, ignore_index)
    raise VisionLoraError(f"{name}: an {image.mode} colour mask, not a palette or single-channel image; save masks "
                          "whose pixel values are the class ids (palette 'P' or grayscale 'L' PNG)")


def _map_colours(rgb: np.ndarray, colours: tuple, name: str, ignore_index: int) -> np.ndarray:
    """Class ids of an RGB mask through a colour table; VOC's border colour is ignored unless it is a class."""
    table = {(r << 16) | (g << 8) | b: index for index, (r, g, b) in enumerate(colours)}
    border = (VOC_BORDER_COLOUR[0] << 16) | (VOC_BORDER_COLOUR[1] << 8) | VOC_BORDER_COLOUR[2]
    table.setdefault(border, ignore_index)
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    unique, inverse = np.unique(codes, return_inverse=True)
    unknown = [int(c) for c in unique if int(c) not in table]
    if unknown:
        shown = ", ".join(f"({c >> 16},{(c >> 8) & 255},{c & 255})" for c in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise VisionLoraError(f"{name}: colours {shown}{more} are not in the class colour table "
                              f"(labelmap.txt or the VOC palette)")
    return np.array([table[int(c)] for c in unique], dtype=np.int64)[inverse].reshape(codes.shape)


def _checked(ids: np.ndarray, num_classes: int, ignore_index: int, name: str) -> np.ndarray:
    values = np.unique(ids)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (f" and {bad.size - 10} more" if bad.size > 10 else "")
        raise VisionLoraError(f"{name}: class id{'s' if bad.size > 1 else ''} {shown} outside the {num_classes} "
                              f"classes (ids 0-{num_classes - 1}, {ignore_index} = ignore)")
    return ids.astype(np.uint8)


# -- class lists -------------------------------------------------------------------------------
def read_classes_txt(path: Path) -> list[str]:
    """One class name per line; line 1 is class 0. Blank lines are left out."""
    names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    return _unique_names(path, names)


def read_id2label(path: Path) -> list[str]:
    """``{"0": "background", "1": ...}`` (or a config's ``{"id2label": {...}}``): ids must run 0, 1, 2, ..."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise VisionLoraError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno})") from None
    return id2label_names(data, str(path))


def id2label_names(data: Any, where: str) -> list[str]:
    """Class names in id order from an id -> name mapping; ids must run 0, 1, 2, ..."""
    if isinstance(data, dict) and isinstance(data.get("id2label"), dict):
        data = data["id2label"]
    if not isinstance(data, dict) or not data:
        raise VisionLoraError(f'{where}: expected an object of class ids and names, {{"0": "background", ...}}')
    names = {}
    for key, value in data.items():
        try:
            names[int(key)] = str(value)
        except (TypeError, ValueError):
            raise VisionLoraError(f"{where}: class id {key!r} is not a whole number") from None
    missing = sorted(set(range(len(names))) - set(names))
    if missing:
        raise VisionLoraError(f"{where}: class ids must run 0 to {len(names) - 1}; missing "
                              f"{', '.join(str(m) for m in missing[:10])}")
    return _unique_names(Path(where), [names[i] for i in range(len(names))])


def read_labelmap(path: Path) -> tuple[list[str], list[tuple[int, int, int]] | None]:
    """CVAT/Datumaro ``labelmap.txt``: ``name:r,g,b:parts:actions`` lines; the colours when every line has one."""
    names: list[str] = []
    colours: list[tuple[int, int, int]] = []
    every_line_coloured = True
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        names.append(fields[0].strip())
        colour = fields[1].strip() if len(fields) > 1 else ""
        if not colour:
            every_line_coloured = False
            continue
        try:
            rgb = tuple(int(v) for v in colour.split(","))
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise VisionLoraError(f"{path}: line {number}: colour {colour!r} must be r,g,b with values 0-255")
        colours.append((rgb[0], rgb[1], rgb[2]))
    names = _unique_names(path, names)
    return names, (colours if every_line_coloured else None)


def _unique_names(path: Path, names: list[str]) -> list[str]:
    if not names:
        raise VisionLoraError(f"{path}: no class names")
    if any(not n for n in names):
        raise VisionLoraError(f"{path}: class {names.index('')} has an empty name")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise VisionLoraError(f"{path}: class name{'s' if len(repeated) > 1 else ''} {', '.join(repeated)} "
                              "appear more than once")
    return names


def read_text(path: Path) -> str:
    """A class list's or image list's text; a file that is not UTF-8 is an error naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise VisionLoraError(f"{path}: not a UTF-8 text file") from None


def class_file(folder: Path, name: str) -> Path | None:
    """``folder/name``, else ``name`` beside a train/val/test part folder (one class list for all parts)."""
    candidates = [folder / name]
    if folder.name in TRAIN_DIRS + VAL_DIRS + TEST_DIRS:
        candidates.append(folder.parent / name)
    return next((c for c in candidates if c.is_file()), None)


def images_by_stem(folder: Path) -> dict[str, Path]:
    """Image files under ``folder`` by their relative path without extension; two images of one stem are an error."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)):
        stem = path.relative_to(folder).with_suffix("").as_posix()
        if stem in found:
            raise VisionLoraError(f"{folder}: two images named {stem} ({found[stem].name}, {path.name}); "
                                  "masks are matched by name")
        found[stem] = path
    return found


def part_extra(palette: list[tuple[int, int, int]] | None = None, notes: list[str] | None = None) -> dict[str, Any]:
    """A mask part's ``extra``: the ignore value, its notes and (when the format has one) its class colours."""
    extra: dict[str, Any] = {"ignore_index": IGNORE_INDEX, "notes": notes or []}
    if palette:
        extra["palette"] = [list(colour) for colour in palette]
    return extra

