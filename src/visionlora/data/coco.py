"""COCO JSON: object detection and keypoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visionlora.data.paths import resolve_image
from visionlora.data.records import (
    DataFormat,
    DetectionRecord,
    Part,
    PoseInstance,
    PoseRecord,
    clean_box,
    keypoint_array,
)
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


def coco_file(path: Path) -> Path | None:
    """``path`` itself when it is a ``.json`` file, else the one COCO file in the folder."""
    if path.is_file():
        return path if path.suffix == ".json" else None
    return find_coco_json(path) if path.is_dir() else None


def require_coco_file(path: Path) -> Path:
    """``coco_file(path)``, or a :class:`VisionLoraError` when there is none."""
    found = coco_file(path)
    if found is None:
        raise VisionLoraError(f"{path}: no COCO .json file (the file itself, or one in the folder or its annotations/)")
    return found


def read_coco_detection(path: Path) -> Part:
    """Read a COCO detection file; images sit beside it, in ``images/``, or one folder up."""
    path = require_coco_file(path)
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
    used = {_key(ann.get("category_id")) for ann in data.get("annotations", [])}
    names, notes = _drop_export_supercategory(path, categories, used)
    return Part(list(records.values()), names, "coco", str(path), dropped=dropped, extra={"notes": notes})


def _drop_export_supercategory(path: Path, categories: dict, used: set) -> tuple[list[str], list[str]]:
    """Category names, without the one labelling tools add for the dataset itself (Roboflow's
    category 0): no annotations, and the supercategory of every other category. Other
    categories without annotations are kept and reported."""
    names, notes = [], []
    for key, entry in categories.items():
        name = str(entry["name"])
        if key in used:
            names.append(name)
            continue
        if is_dataset_name(key, name, categories):
            notes.append(f"{path}: category {name!r} has no annotations and is the supercategory of all the "
                         "others (a labelling tool's dataset name): left out")
            continue
        notes.append(f"{path}: category {name!r} has no annotations")
        names.append(name)
    return names, notes


def _xywh_to_xyxy(bbox: Any, where: str) -> list[float]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        raise VisionLoraError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def _key(value: Any) -> Any:
    """Ids compare as given, except that 3 and "3" are the same id."""
    return str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else repr(value)


def read_coco_keypoints(path: Path) -> Part:
    """Read a COCO keypoints file; its labels are the keypoint names, ``extra`` holds the skeleton.

    The first category that names ``keypoints`` is used; instances without one labelled
    keypoint are skipped and counted. Images without instances are left out.
    """
    path = require_coco_file(path)
    data = load_coco(path)
    images = index_images(path, data)
    categories = index_categories(path, data)
    keypoint_categories = [(k, c) for k, c in categories.items() if c.get("keypoints")]
    if not keypoint_categories:
        raise VisionLoraError(f"{path}: no category names its 'keypoints' (not a COCO keypoints file?)")
    category_key, category = keypoint_categories[0]
    names = [str(n) for n in category["keypoints"]]
    skeleton = _skeleton(path, category, len(names))
    root = path.parent.parent if path.parent.name == "annotations" else path.parent
    records: dict[Any, PoseRecord] = {}
    skipped = []
    for position, ann in enumerate(data.get("annotations", [])):
        check_annotation(path, position, ann, images, categories)
        if _key(ann.get("category_id")) != category_key:
            continue
        where = f"{path}: annotation {ann.get('id', position)}"
        entry = images[_key(ann["image_id"])]
        keypoints = keypoint_array(ann.get("keypoints", []), names, where, entry.get("width"), entry.get("height"))
        if not keypoints[:, 2].any():
            skipped.append({"annotation": where, "reason": "no labelled keypoint"})
            continue
        box = None
        if ann.get("bbox") is not None:
            box = clean_box(_xywh_to_xyxy(ann["bbox"], where), entry.get("width"), entry.get("height"))
        key = _key(ann["image_id"])
        if key not in records:
            image_where = f"{path}: image id {entry['id']}"
            records[key] = PoseRecord(str(resolve_image(root, entry["file_name"], image_where)), source=image_where)
        records[key].instances.append(PoseInstance(keypoints, box, ann.get("area")))
    return Part(list(records.values()), names, "coco-keypoints", str(path), skipped=skipped,
                extra={"skeleton": skeleton})


def _skeleton(path: Path, category: dict, count: int) -> list[list[int]]:
    """COCO skeletons are 1-based index pairs; return them 0-based, checked."""
    pairs = []
    for pair in category.get("skeleton") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(i, int) and 1 <= i <= count for i in pair)):
            raise VisionLoraError(f"{path}: skeleton entry {pair!r} must be two keypoint numbers from 1 to {count}")
        pairs.append([pair[0] - 1, pair[1] - 1])
    return pairs


DETECTION = DataFormat(
    name="coco",
    expected="a COCO .json file",
    finds=lambda path: coco_file(path) is not None,
    read=read_coco_detection,
)
KEYPOINTS = DataFormat(
    name="coco-keypoints",
    expected="a COCO keypoints .json file",
    finds=lambda path: coco_file(path) is not None,
    read=read_coco_keypoints,
)


def is_dataset_name(key: Any, name: str, categories: dict[Any, dict]) -> bool:
    """Whether the category ``key`` is every other category's supercategory: a labelling tool's
    dataset name (Roboflow) rather than a class."""
    others = [c for k, c in categories.items() if k != key]
    return bool(others) and all(str(c.get("supercategory")) == name for c in others)
