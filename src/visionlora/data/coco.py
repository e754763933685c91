"""COCO JSON: object detection (and the shared checks used for keypoints)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visionlora.data.detection import DetectionRecord, DetectionSplit, clean_box
from visionlora.data.paths import resolve_image
from visionlora.errors import VisionLoraError


def find_coco_json(folder: Path) -> Path | None:
    """The one COCO ``.json`` file in ``folder`` or ``folder/annotations``, if any."""
    found = sorted(folder.glob("*.json")) or sorted((folder / "annotations").glob("*.json"))
    found = [p for p in found if not p.name.startswith(".")]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise VisionLoraError(f"{folder}: several .json files ({names}); pass the COCO file itself")
    return found[0] if found else None


def load_coco(path: Path) -> dict[str, Any]:
    """Parse and structurally check a COCO file: images, annotations and categories lists."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VisionLoraError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError:
        raise VisionLoraError(f"{path}: not a text file") from None
    if not isinstance(data, dict):
        raise VisionLoraError(f"{path}: expected a COCO object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise VisionLoraError(f"{path}: '{key}' must be a list")
    if "images" not in data:
        raise VisionLoraError(f"{path}: no 'images' list (not a COCO file?)")
    return data


def index_images(path: Path, data: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    """image id -> image entry; duplicate ids and entries without a file name are errors."""
    images: dict[Any, dict[str, Any]] = {}
    for position, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise VisionLoraError(f"{path}: images[{position}] needs an 'id' and a 'file_name'")
        if _key(entry["id"]) in images:
            raise VisionLoraError(f"{path}: image id {entry['id']} appears more than once")
        images[_key(entry["id"])] = entry
    return images


def index_categories(path: Path, data: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    """category id -> category entry, in id order."""
    categories: dict[Any, dict[str, Any]] = {}
    for position, entry in enumerate(data.get("categories", [])):
        if not isinstance(entry, dict) or "id" not in entry or "name" not in entry:
            raise VisionLoraError(f"{path}: categories[{position}] needs an 'id' and a 'name'")
        if _key(entry["id"]) in categories:
            raise VisionLoraError(f"{path}: category id {entry['id']} appears more than once")
        categories[_key(entry["id"])] = entry
    return dict(sorted(categories.items(), key=lambda item: str(item[0]).zfill(12)))


def check_annotation(path: Path, position: int, ann: Any, images: dict, categories: dict) -> None:
    """An annotation must name a known image and a known category."""
    if not isinstance(ann, dict) or "image_id" not in ann:
        raise VisionLoraError(f"{path}: annotations[{position}] has no 'image_id'")
    label = f"annotation {ann.get('id', position)}"
    if _key(ann["image_id"]) not in images:
        raise VisionLoraError(f"{path}: {label} points to image id {ann['image_id']}, which is not in 'images'")
    if _key(ann.get("category_id")) not in categories:
        known = ", ".join(str(c) for c in categories) or "none"
        raise VisionLoraError(f"{path}: {label} has unknown category_id {ann.get('category_id')} (known: {known})")


def read_coco_detection(path: Path) -> DetectionSplit:
    """Read a COCO detection file; images sit beside it, in ``images/``, or one folder up."""
    data = load_coco(path)
    images = index_images(path, data)
    categories = index_categories(path, data)
    names = [str(c["name"]) for c in categories.values()]
    root = path.parent.parent if path.parent.name == "annotations" else path.parent
    records: dict[Any, DetectionRecord] = {}
    for key, entry in images.items():
        where = f"{path}: image id {entry['id']}"
        records[key] = DetectionRecord(str(resolve_image(root, entry["file_name"], where)), source=where)
    dropped = []
    for position, ann in enumerate(data.get("annotations", [])):
        check_annotation(path, position, ann, images, categories)
        label = f"{path}: annotation {ann.get('id', position)}"
        if ann.get("iscrowd"):
            dropped.append({"annotation": label, "reason": "crowd region (not a single object)"})
            continue
        box = _xywh_to_xyxy(ann.get("bbox"), label)
        entry = images[_key(ann["image_id"])]
        cleaned = clean_box(box, entry.get("width"), entry.get("height"))
        if cleaned is None:
            dropped.append({"annotation": label, "reason": f"zero-area or invalid box {ann.get('bbox')}"})
            continue
        record = records[_key(ann["image_id"])]
        record.boxes.append(cleaned)
        record.labels.append(str(categories[_key(ann["category_id"])]["name"]))
    return DetectionSplit(list(records.values()), names, dropped, "coco")


def _xywh_to_xyxy(bbox: Any, where: str) -> list[float]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        raise VisionLoraError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def _key(value: Any) -> Any:
    """Ids compare as given, except that 3 and "3" are the same id."""
    return str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else repr(value)
