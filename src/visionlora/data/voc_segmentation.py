"""Pascal VOC segmentation (``voc-segmentation``): ``JPEGImages/`` and ``SegmentationClass/`` palette PNGs.

Optionally ``ImageSets/Segmentation/{train,val,trainval}.txt`` lists the images of each part;
the classes are the 21 VOC classes unless a ``labelmap.txt`` (CVAT/Datumaro) or ``classes.txt``
names others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from visionlora.data.masks import (
    ColourMask,
    SegmentationRecord,
    class_file,
    images_by_stem,
    part_extra,
    read_classes_txt,
    read_labelmap,
    read_text,
    voc_palette,
)
from visionlora.data.records import DataFormat, Part
from visionlora.errors import VisionLoraError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def is_voc_segmentation(path: Path) -> bool:
    return (path / "JPEGImages").is_dir() and (path / "SegmentationClass").is_dir()


def read_voc_segmentation(folder: Path) -> Part:
    """The images with a mask, or those ImageSets/Segmentation lists; train.txt with val.txt carries val."""
    names, colours = _voc_classes(folder)
    images = images_by_stem(folder / "JPEGImages")
    lists = folder / "ImageSets" / "Segmentation"
    extra = part_extra(colours)

    def part(list_file: Path | None) -> Part:
        records, notes = (_voc_listed(folder, list_file, images, colours) if list_file
                          else _voc_all(folder, images, colours))
        where = f"{folder} ({list_file.name})" if list_file else str(folder)
        return Part(records, list(names), "voc-segmentation", where, extra={**extra, "notes": notes})

    if (lists / "train.txt").is_file() and (lists / "val.txt").is_file():
        train = part(lists / "train.txt")
        train.own_val = part(lists / "val.txt")
        return train
    return part(next((lists / n for n in ("train.txt", "trainval.txt") if (lists / n).is_file()), None))


def _voc_classes(folder: Path) -> tuple[list[str], list[tuple[int, int, int]] | None]:
    """labelmap.txt (with its colours), else classes.txt (no colours), else the VOC classes and palette."""
    labelmap, classes = class_file(folder, "labelmap.txt"), class_file(folder, "classes.txt")
    if labelmap:
        return read_labelmap(labelmap)
    if classes:
        return read_classes_txt(classes), None
    return list(VOC_CLASSES), voc_palette(len(VOC_CLASSES))


def _voc_mask(path: Path, colours: Sequence[tuple[int, int, int]] | None) -> Any:
    return ColourMask(str(path), tuple(colours)) if colours else str(path)


def _voc_listed(folder: Path, list_file: Path, images: dict[str, Path],
                colours: Sequence[tuple[int, int, int]] | None) -> tuple[list, list[str]]:
    records = []
    for line in read_text(list_file).splitlines():
        if not line.strip():
            continue
        stem = line.split()[0]
        if stem not in images:
            raise VisionLoraError(f"{list_file}: image {stem!r} not found in {folder / 'JPEGImages'}")
        mask = folder / "SegmentationClass" / f"{stem}.png"
        if not mask.is_file():
            raise VisionLoraError(f"{images[stem]}: no mask (looked for {mask})")
        records.append(SegmentationRecord(str(images[stem]), _voc_mask(mask, colours), source=str(mask)))
    if not records:
        raise VisionLoraError(f"{list_file}: lists no images")
    return records, []


def _voc_all(folder: Path, images: dict[str, Path],
             colours: Sequence[tuple[int, int, int]] | None) -> tuple[list, list[str]]:
    masks_dir = folder / "SegmentationClass"
    records = [SegmentationRecord(str(image), _voc_mask(masks_dir / f"{stem}.png", colours),
                                  source=str(masks_dir / f"{stem}.png"))
               for stem, image in images.items() if (masks_dir / f"{stem}.png").is_file()]
    if not records:
        raise VisionLoraError(f"{folder}: no image in JPEGImages/ has a .png mask of the same name in "
                              "SegmentationClass/")
    notes = []
    if len(records) < len(images):
        notes.append(f"{folder}: {len(images) - len(records)} images in JPEGImages/ have no mask in "
                     "SegmentationClass/: left out")
    orphans = sorted(p.name for p in masks_dir.glob("*.png") if p.stem not in images)
    if orphans:
        notes.append(f"{masks_dir}: {len(orphans)} masks have no image in JPEGImages/ (e.g. {orphans[0]}): left out")
    return records, notes



FORMAT = DataFormat(
    name="voc-segmentation",
    expected="a Pascal VOC folder with JPEGImages/ and SegmentationClass/",
    finds=is_voc_segmentation,
    read=read_voc_segmentation,
)
