"""COCO JSON with polygon or RLE segmentations (``coco-segmentation``), drawn into a mask when loaded.

Class 0 is background, then the categories by id; each image's annotations become a
:class:`~visionlora.data.coco_masks.CocoMask` that :func:`~visionlora.data.masks.load_mask` draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visionlora.data.coco import (
    _key,
    check_annotation,
    coco_file,
    index_categories,
    index_images,
    is_dataset_name,
    load_coco,
    require_coco_file,
)
from visionlora.data.coco_masks import SEGMENTATION_KEY, CocoMask, CocoShape, check_segmentation
from visionlora.data.masks import SegmentationRecord, part_extra
from visionlora.data.paths import resolve_image
from visionlora.data.records import DataFormat, Part


def read_coco_segmentation(path: Path) -> Part:
    """Every image of a COCO file with its segmentations: class 0 is background, then the categories by id."""
    path = require_coco_file(path)
    data = load_coco(path)
    images = index_images(path, data)
    categories = index_categories(path, data)
    annotations = data.get("annotations", [])
    used = {_key(ann.get("category_id")) for ann in annotations if isinstance(ann, dict)}
    class_of, names, notes = _coco_classes(path, categories, used)
    shapes: dict[Any, list[CocoShape]] = {key: [] for key in images}
    for position, ann in enumerate(annotations):
        check_annotation(path, position, ann, images, categories)
        where = f"{path}: annotation {ann.get('id', position)}"
        key = _key(ann["image_id"])
        height, width = _image_size(images[key])
        segmentation = check_segmentation(ann.get(SEGMENTATION_KEY), height, width, where)
        shapes[key].append(CocoShape(ann.get("id", position), class_of[_key(ann["category_id"])], segmentation,
                                     bool(ann.get("iscrowd"))))
    root = path.parent.parent if path.parent.name == "annotations" else path.parent
    records = []
    for key, entry in images.items():
        where = f"{path}: image id {entry['id']}"
        height, width = _image_size(entry)
        records.append(SegmentationRecord(str(resolve_image(root, entry["file_name"], where)),
                                          CocoMask(where, height, width, tuple(shapes[key])), source=where))
    return Part(records, names, "coco-segmentation", str(path), extra=part_extra(notes=notes))


def _coco_classes(path: Path, categories: dict, used: set) -> tuple[dict[Any, int], list[str], list[str]]:
    """category key -> class id, class names and notes. A category named background is class 0; one without
    annotations that is every other's supercategory (a labelling tool's dataset name) is left out."""
    class_of: dict[Any, int] = {}
    names, notes = ["background"], []
    for key, entry in categories.items():
        name = str(entry["name"])
        if key not in used:
            if is_dataset_name(key, name, categories):
                notes.append(f"{path}: category {name!r} has no annotations and is the supercategory of all the "
                             "others (a labelling tool's dataset name): left out")
                continue
            notes.append(f"{path}: category {name!r} has no annotations")
        if name.lower() == "background":
            name = "background"
        if name not in names:
            names.append(name)
        class_of[key] = names.index(name)
    return class_of, names, notes


def _image_size(entry: dict) -> tuple[int | None, int | None]:
    """(height, width) of a COCO image entry, None when not given as positive whole numbers."""
    sizes = [v for v in (entry.get("height"), entry.get("width"))
             if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and float(v).is_integer()]
    if len(sizes) == 2:
        return int(sizes[0]), int(sizes[1])
    return None, None


FORMAT = DataFormat(
    name="coco-segmentation",
    expected="a COCO .json file with polygon or RLE segmentations",
    finds=lambda path: coco_file(path) is not None,
    read=read_coco_segmentation,
)
