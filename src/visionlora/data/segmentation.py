"""Semantic segmentation: images with a mask of class ids, one per pixel.

Formats, in the order they are tried:

- Pascal VOC (``voc-segmentation``): ``JPEGImages/`` and ``SegmentationClass/`` palette PNGs,
  optionally ``ImageSets/Segmentation/{train,val,trainval}.txt``; the 21 VOC classes unless a
  ``labelmap.txt`` (CVAT/Datumaro) or ``classes.txt`` names others.
- Mask folders (``mask-folders``): ``images/`` and ``masks/`` matched by file stem, with a
  ``classes.txt`` or ``id2label.json``.
- A saved Hugging Face dataset (``huggingface-segmentation``): an image and an annotation column.
- COCO JSON with polygon or RLE segmentations (``coco-segmentation``), drawn when loaded.

A mask's pixel values are class ids (a palette PNG's indices, a grayscale PNG's values);
:data:`IGNORE_INDEX` (255, VOC's object borders) marks pixels that count for nothing.
"""

from __future__ import annotations

import glob
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from visionlora.data import hf_datasets
from visionlora.data.coco import (
    _key,
    check_annotation,
    coco_file,
    index_categories,
    index_images,
    is_dataset_name,
    load_coco,
)
from visionlora.data.coco_masks import SEGMENTATION_KEY, CocoMask, CocoShape, check_segmentation, rasterise
from visionlora.data.images import MAX_IMAGE_PIXELS, is_image_file
from visionlora.data.paths import resolve_image
from visionlora.data.records import DataFormat, Part
from visionlora.data.splits import TEST_DIRS, TRAIN_DIRS, VAL_DIRS
from visionlora.errors import VisionLoraError

IGNORE_INDEX = 255
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_BORDER_COLOUR = (224, 224, 192)  # index 255 of the VOC palette
# Image columns that hold the masks, by name (else the second Image column)
ANNOTATION_COLUMNS = tuple("annotation label mask segmentation semantic_map gtFine".split())
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
    names = [line.strip() for line in _text(path).splitlines() if line.strip()]
    return _unique_names(path, names)


def read_id2label(path: Path) -> list[str]:
    """``{"0": "background", "1": ...}`` (or a config's ``{"id2label": {...}}``): ids must run 0, 1, 2, ..."""
    try:
        data = json.loads(_text(path))
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
    names, colours = [], []
    for number, line in enumerate(_text(path).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        names.append(fields[0].strip())
        colour = fields[1].strip() if len(fields) > 1 else ""
        if not colour:
            colours.append(None)
            continue
        try:
            rgb = tuple(int(v) for v in colour.split(","))
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise VisionLoraError(f"{path}: line {number}: colour {colour!r} must be r,g,b with values 0-255")
        colours.append(rgb)
    names = _unique_names(path, names)
    return names, (colours if all(c is not None for c in colours) else None)


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


def _text(path: Path) -> str:
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


def _images_by_stem(folder: Path) -> dict[str, Path]:
    """Image files under ``folder`` by their relative path without extension; two images of one stem are an error."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)):
        stem = path.relative_to(folder).with_suffix("").as_posix()
        if stem in found:
            raise VisionLoraError(f"{folder}: two images named {stem} ({found[stem].name}, {path.name}); "
                                  "masks are matched by name")
        found[stem] = path
    return found


def _extra(palette: list[tuple[int, int, int]] | None = None, notes: list[str] | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"ignore_index": IGNORE_INDEX, "notes": notes or []}
    if palette:
        extra["palette"] = [list(colour) for colour in palette]
    return extra


# -- Pascal VOC ---------------------------------------------------------------------------------
def is_voc_segmentation(path: Path) -> bool:
    return (path / "JPEGImages").is_dir() and (path / "SegmentationClass").is_dir()


def read_voc_segmentation(folder: Path) -> Part:
    """The images with a mask, or those ImageSets/Segmentation lists; train.txt with val.txt carries val."""
    names, colours = _voc_classes(folder)
    images = _images_by_stem(folder / "JPEGImages")
    lists = folder / "ImageSets" / "Segmentation"
    extra = _extra(colours)

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


def _voc_mask(path: Path, colours) -> Any:
    return ColourMask(str(path), tuple(colours)) if colours else str(path)


def _voc_listed(folder: Path, list_file: Path, images: dict[str, Path], colours) -> tuple[list, list[str]]:
    records = []
    for line in _text(list_file).splitlines():
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


def _voc_all(folder: Path, images: dict[str, Path], colours) -> tuple[list, list[str]]:
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


# -- images/ and masks/ folders ------------------------------------------------------------------
def is_mask_folders(path: Path) -> bool:
    return (path / "images").is_dir() and (path / "masks").is_dir()


def read_mask_folders(folder: Path) -> Part:
    """Every image in ``images/`` with ``masks/<same relative path>.png``; classes from classes.txt or id2label.json."""
    names = _folder_classes(folder)
    images = _images_by_stem(folder / "images")
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
    return Part(records, names, "mask-folders", str(folder), extra=_extra(notes=notes))


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


# -- Hugging Face datasets -----------------------------------------------------------------------
def read_hf_segmentation(path: Path) -> Part:
    """The train split, carrying the first of validation/val/valid/test as its own validation part."""
    data = str(path)
    loaded, val_name = hf_datasets.train_and_validation(data, ("validation",) + VAL_DIRS + ("test",))
    image_col, mask_col = _hf_columns(loaded["train"], data)
    names = _hf_class_names(path, loaded["train"], data)
    part = Part(_hf_records(loaded["train"], "train", image_col, mask_col, data), names,
                "huggingface-segmentation", f"{data} (train)", extra=_extra())
    if val_name:
        val_image_col, val_mask_col = _hf_columns(loaded[val_name], f"{data} ({val_name})")
        part.own_val = Part(_hf_records(loaded[val_name], val_name, val_image_col, val_mask_col, data), list(names),
                            "huggingface-segmentation", f"{data} ({val_name})", extra=_extra())
    return part


def _hf_columns(split, data: str) -> tuple[str, str]:
    """(image column, annotation column): the annotation is the Image column named like one, else the second."""
    import datasets

    features = split.features
    image_cols = [name for name, f in features.items() if isinstance(f, datasets.Image)]
    named = [c for c in image_cols if c in ANNOTATION_COLUMNS]
    if len(image_cols) < 2:
        raise VisionLoraError(f"{data}: needs an image column and an annotation (mask) image column "
                              f"(columns: {', '.join(features)})")
    mask_col = named[0] if named else image_cols[1]
    return next(c for c in image_cols if c != mask_col), mask_col


def _hf_class_names(path: Path, split, data: str) -> list[str]:
    """id2label.json in the dataset folder (or beside a saved split's folder), else an id2label mapping
    in the dataset's description."""
    found = class_file(path, "id2label.json") if path.is_dir() else None
    if found:
        return read_id2label(found)
    try:
        described = json.loads(split.info.description or "")
    except (json.JSONDecodeError, TypeError):
        described = None
    if isinstance(described, dict) and described:
        return id2label_names(described, f"{data} (description)")
    raise VisionLoraError(f'{data}: no class names; add an id2label.json ({{"0": "background", "1": ...}}) '
                          "to the dataset folder")


def _hf_records(split, split_name: str, image_col: str, mask_col: str, data: str) -> list[SegmentationRecord]:
    """A lazy record per row; a row without an image or an annotation is an error naming it."""
    columns = split.with_format("arrow")
    for column, what in ((image_col, "image"), (mask_col, "annotation")):
        nulls = columns[column].is_null().to_pylist()
        if any(nulls):
            row = nulls.index(True)
            raise VisionLoraError(f"{data} ({split_name}[{row}]): no {what} in column '{column}' "
                                  f"({sum(nulls)} rows of {len(nulls)} have none)")
    images, masks = split.select_columns([image_col]), split.select_columns([mask_col])  # a row decodes one picture
    return [SegmentationRecord(hf_datasets.DatasetRow(images, split_name, i, image_col),
                               hf_datasets.DatasetRow(masks, split_name, i, mask_col),
                               source=f"{data} ({split_name}[{i}])")
            for i in range(len(split))]


# -- COCO polygons and RLE --------------------------------------------------------------------------
def read_coco_segmentation(path: Path) -> Part:
    """Every image of a COCO file with its segmentations: class 0 is background, then the categories by id."""
    path = coco_file(path)
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
    return Part(records, names, "coco-segmentation", str(path), extra=_extra(notes=notes))


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
    height, width = entry.get("height"), entry.get("width")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and float(v).is_integer()
           for v in (height, width)):
        return int(height), int(width)
    return None, None


FORMATS = [
    DataFormat(
        name="voc-segmentation",
        expected="a Pascal VOC folder with JPEGImages/ and SegmentationClass/",
        finds=is_voc_segmentation,
        read=read_voc_segmentation,
    ),
    DataFormat(
        name="mask-folders",
        expected="images/ and masks/ folders (.png masks of class ids) with classes.txt or id2label.json",
        finds=is_mask_folders,
        read=read_mask_folders,
    ),
    DataFormat(
        name="huggingface-segmentation",
        expected="a saved Hugging Face dataset folder or a hub dataset id, with an image and an annotation column",
        finds=hf_datasets.is_dataset_reference,
        read=read_hf_segmentation,
    ),
    DataFormat(
        name="coco-segmentation",
        expected="a COCO .json file with polygon or RLE segmentations",
        finds=lambda path: coco_file(path) is not None,
        read=read_coco_segmentation,
    ),
]
FORMAT_NAMES = tuple(f.name for f in FORMATS)  # a segmentation task's ``data_formats``, in the order to try them
