"""Image and mask folders (``mask-folders``): ``images/`` and ``masks/`` matched by file stem.

The masks are .png files of class ids; the class names come from a ``classes.txt`` or an
``id2label.json`` in the folder (or beside its train/val folders).
"""

from __future__ import annotations

import glob
from pathlib import Path

from visionlora.data.masks import (
    SegmentationRecord,
    class_file,
    images_by_stem,
    part_extra,
    read_classes_txt,
    read_id2label,
)
from visionlora.data.records import DataFormat, Part
from visionlora.errors import VisionLoraError


def is_mask_folders(path: Path) -> bool:
    return (path / "images").is_dir() and (path / "masks").is_dir()


def read_mask_folders(folder: Path) -> Part:
    """Every image in ``images/`` with ``masks/<same relative path>.png``; classes from classes.txt or id2label.json."""
    names = _folder_classes(folder)
    images = images_by_stem(folder / "images")
    if not images:
        raise VisionLoraError(f"{folder / 'images'}: no images")
    masks_dir = folder / "masks"
    records = []
    for stem, image in images.items():
        mask = masks_dir / f"{stem}.png"
        if not mask.is_file():
            others = sorted(mask.parent.glob(glob.escape(Path(stem).name) + ".*"))
            hint = f"; found {others[0].name}, but masks must be .png (lossless)" if others else ""
            raise VisionLoraError(f"{image}: no mask (looked for {mask}){hint}")
        records.append(SegmentationRecord(str(image), str(mask), source=str(mask)))
    orphans = sorted(p for p in masks_dir.rglob("*.png") if p.relative_to(masks_dir).with_suffix("").as_posix()
                     not in images)
    notes = [f"{masks_dir}: {len(orphans)} masks have no image in images/ (e.g. {orphans[0].name}): left out"] \
        if orphans else []
    return Part(records, names, "mask-folders", str(folder), extra=part_extra(notes=notes))


def _folder_classes(folder: Path) -> list[str]:
    txt, json_file = class_file(folder, "classes.txt"), class_file(folder, "id2label.json")
    if txt and json_file:
        names, other = read_classes_txt(txt), read_id2label(json_file)
        if names != other:
            raise VisionLoraError(f"{txt.parent}: classes.txt and id2label.json list different classes; keep one")
        return names
    if json_file:
        return read_id2label(json_file)
    if txt:
        return read_classes_txt(txt)
    raise VisionLoraError(f"{folder}: no class list; add classes.txt (one class name per line, the first is "
                          'class 0) or id2label.json ({"0": "background", "1": ...}) to it (or beside its '
                          "train/val folders)")



FORMAT = DataFormat(
    name="mask-folders",
    expected="images/ and masks/ folders (.png masks of class ids) with classes.txt or id2label.json",
    finds=is_mask_folders,
    read=read_mask_folders,
)
