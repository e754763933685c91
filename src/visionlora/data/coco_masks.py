"""COCO polygon and RLE segmentations: checked when read, drawn into a semantic mask when loaded.

A :class:`CocoMask` is what a COCO segmentation record keeps instead of a mask file: the
image's size from the JSON file and its annotations as (id, class id, segmentation, crowd).
:func:`rasterise` draws it with pycocotools: class 0 (background) everywhere, crowd regions
as the ignore value, then the other annotations from the largest to the smallest, so that
small objects lying on larger ones stay visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionlora.data.images import MAX_IMAGE_PIXELS
from visionlora.errors import VisionLoraError

SEGMENTATION_KEY = "segmentation"  # the COCO annotation field, not a task name
MAX_COORDINATE = 100_000  # polygon points further out are mistakes (and would make pycocotools draw for ages)


@dataclass(frozen=True)
class CocoShape:
    """One annotation: its id (for messages), class id, checked segmentation and crowd flag."""

    id: Any
    class_id: int
    segmentation: Any  # a list of polygons (flat x, y lists) or an RLE dict {"size": [h, w], "counts": ...}
    crowd: bool = False


@dataclass(frozen=True)
class CocoMask:
    """What to draw for one image: its size in the COCO file (None when not given) and its shapes."""

    where: str  # "<file>: image id <id>", for messages
    height: int | None
    width: int | None
    shapes: tuple[CocoShape, ...] = ()

    def __str__(self) -> str:
        return self.where


def check_segmentation(segmentation: Any, height: int | None, width: int | None, where: str) -> Any:
    """The segmentation in a form :func:`rasterise` draws: polygons as lists of floats, RLE as given.

    ``where`` names the file and annotation. A flat list of numbers is taken as one polygon.
    """
    if segmentation is None:
        raise VisionLoraError(f"{where}: has no 'segmentation' (polygons or RLE); a detection file?")
    if isinstance(segmentation, dict):
        return _check_rle(segmentation, height, width, where)
    if not isinstance(segmentation, (list, tuple)) or not segmentation:
        raise VisionLoraError(f"{where}: 'segmentation' must be a list of polygons or an RLE dict "
                              f"with 'size' and 'counts', got {_short(segmentation)}")
    polygons = [segmentation] if all(_is_number(v) for v in segmentation) else segmentation
    checked = []
    for index, polygon in enumerate(polygons):
        if not isinstance(polygon, (list, tuple)) or not all(_is_number(v) for v in polygon):
            raise VisionLoraError(f"{where}: polygon {index + 1} must be a list of numbers [x1, y1, x2, y2, ...], "
                                  f"got {_short(polygon)}")
        if len(polygon) < 6 or len(polygon) % 2:
            raise VisionLoraError(f"{where}: polygon {index + 1} has {len(polygon)} numbers; a polygon needs "
                                  "an even count of at least 6 (three x, y points)")
        far = [v for v in polygon if abs(v) > MAX_COORDINATE]
        if far:
            raise VisionLoraError(f"{where}: polygon {index + 1} has coordinate {far[0]}, far outside any image")
        checked.append([float(v) for v in polygon])
    return checked


def _check_rle(rle: dict, height: int | None, width: int | None, where: str) -> dict:
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        raise VisionLoraError(f"{where}: RLE 'size' must be [height, width], got {_short(size)}")
    if MAX_IMAGE_PIXELS is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise VisionLoraError(f"{where}: RLE size {list(size)} is larger than the {MAX_IMAGE_PIXELS} pixel limit")
    if height is not None and width is not None and list(size) != [height, width]:
        raise VisionLoraError(f"{where}: RLE size {list(size)} (height, width) differs from the image's "
                              f"{[height, width]}")
    if isinstance(counts, (list, tuple)):
        values = list(counts)
        if not all(_is_int(v) and v >= 0 for v in values):
            raise VisionLoraError(f"{where}: RLE 'counts' must be non-negative whole numbers")
    elif isinstance(counts, (str, bytes)):
        values = _decode_counts(counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts, where)
    else:
        raise VisionLoraError(f"{where}: RLE 'counts' must be a list of numbers or a compressed string, "
                              f"got {_short(counts)}")
    if sum(values) != size[0] * size[1]:
        raise VisionLoraError(f"{where}: RLE 'counts' cover {sum(values)} pixels, not the {size[0]} x {size[1]} "
                              f"= {size[0] * size[1]} of its size")
    return {"size": [int(size[0]), int(size[1])], "counts": counts if isinstance(counts, (str, bytes)) else values}


def _decode_counts(text: str, where: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' rleFrString), checked."""
    counts: list[int] = []
    position = 0
    try:
        while position < len(text):
            value, shift, more = 0, 0, True
            while more:
                code = ord(text[position]) - 48
                if not 0 <= code < 64:
                    raise ValueError
                value |= (code & 0x1F) << (5 * shift)
                more = bool(code & 0x20)
                position += 1
                shift += 1
                if not more and code & 0x10:
                    value |= -1 << (5 * shift)
            if len(counts) > 2:
                value += counts[-2]
            counts.append(value)
    except (IndexError, ValueError):
        raise VisionLoraError(f"{where}: RLE 'counts' is not a valid compressed RLE string") from None
    if any(v < 0 for v in counts):
        raise VisionLoraError(f"{where}: RLE 'counts' is not a valid compressed RLE string (negative run)")
    return counts


def rasterise(mask: CocoMask, ignore_index: int = 255, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) uint8 class ids for ``mask``; ``image_size`` (width, height) is needed when the file gave no size."""
    from pycocotools import mask as coco_mask

    height: int
    width: int
    if mask.height is not None and mask.width is not None:
        height, width = mask.height, mask.width
    elif image_size is None:
        raise VisionLoraError(f"{mask.where}: the COCO file gives no width and height for this image")
    else:
        width, height = image_size
    if MAX_IMAGE_PIXELS is not None and height * width > MAX_IMAGE_PIXELS:
        raise VisionLoraError(f"{mask.where}: {width}x{height} is larger than the {MAX_IMAGE_PIXELS} pixel limit")
    drawn = []
    for shape in mask.shapes:
        segmentation = shape.segmentation
        if isinstance(segmentation, dict):
            rle = segmentation
            if list(rle["size"]) != [height, width]:
                raise VisionLoraError(f"{mask.where}: annotation {shape.id}: RLE size {rle['size']} (height, width) "
                                      f"differs from the image's {[height, width]}")
            if isinstance(rle["counts"], list):
                rle = coco_mask.frPyObjects(rle, height, width)
        else:
            rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        pixels = coco_mask.decode(rle).astype(bool)
        drawn.append((shape, pixels, int(pixels.sum())))
    out = np.zeros((height, width), dtype=np.uint8)
    for _, pixels, _ in [d for d in drawn if d[0].crowd]:
        out[pixels] = ignore_index
    for shape, pixels, _ in sorted([d for d in drawn if not d[0].crowd], key=lambda d: -d[2]):
        out[pixels] = shape.class_id
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
