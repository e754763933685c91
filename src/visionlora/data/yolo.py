"""YOLO txt: ``labels/<stem>.txt`` per image (``class cx cy w h``, normalised) and a class-names file."""

from __future__ import annotations

from pathlib import Path

import yaml
from PIL import Image, UnidentifiedImageError

from visionlora.data.images import is_image_file
from visionlora.data.records import DataFormat, DetectionRecord, Part, clean_box
from visionlora.errors import VisionLoraError

NAME_FILES = ("classes.txt", "obj.names", "names.txt", "data.yaml", "dataset.yaml")


def find_yolo_labels(folder: Path) -> list[Path]:
    return sorted((folder / "labels").glob("*.txt"))


def read_yolo(folder: Path) -> Part:
    """Read ``folder/labels/*.txt`` against the images in ``folder/images`` (or ``folder``)."""
    names = _class_names(folder)
    image_dir = folder / "images" if (folder / "images").is_dir() else folder
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.is_file() and is_image_file(p)}
    labels = {p.stem: p for p in find_yolo_labels(folder)}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise VisionLoraError(f"{labels[orphans[0]]}: no image named {orphans[0]}.* in {image_dir}")
    records, dropped = [], []
    for stem, image in images.items():
        record = DetectionRecord(str(image), source=str(labels.get(stem, image)))
        if stem in labels:
            dropped += _read_label_file(labels[stem], image, names, record)
        records.append(record)
    return Part(records, names, "yolo", str(folder), dropped=dropped)


def _read_label_file(path: Path, image: Path, names: list[str], record: DetectionRecord) -> list[dict[str, str]]:
    width, height = displayed_size(image)
    dropped = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{number}"
        if len(parts) != 5:
            raise VisionLoraError(f"{where}: expected 'class cx cy w h' (5 values), got {len(parts)}")
        try:
            cls = int(parts[0])
            cx, cy, w, h = (float(v) for v in parts[1:])
        except ValueError:
            raise VisionLoraError(f"{where}: not numbers: {line.strip()!r}") from None
        if not 0 <= cls < len(names):
            raise VisionLoraError(f"{where}: class {cls} is not in the {len(names)} class names")
        box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        cleaned = clean_box(box, width, height)
        if cleaned is None:
            dropped.append({"annotation": where, "reason": f"zero-area or invalid box {line.strip()}"})
            continue
        record.boxes.append(cleaned)
        record.labels.append(names[cls])
    return dropped


def displayed_size(image: Path) -> tuple[int, int]:
    """(width, height) as shown to a person: EXIF rotations by 90 degrees swap them."""
    try:
        with Image.open(image) as opened:
            width, height = opened.size
            orientation = opened.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError):
        raise VisionLoraError(f"{image}: not a readable image, so its YOLO boxes cannot be placed") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _class_names(folder: Path) -> list[str]:
    for directory in (folder, folder.parent):
        for name in NAME_FILES:
            path = directory / name
            if path.is_file():
                return _read_names(path)
    raise VisionLoraError(f"{folder}: YOLO labels found but no class-names file ({', '.join(NAME_FILES)})")


def _read_names(path: Path) -> list[str]:
    if path.suffix == ".yaml":
        try:
            names = (yaml.safe_load(path.read_text()) or {}).get("names")
        except (yaml.YAMLError, AttributeError):
            raise VisionLoraError(f"{path}: not a YAML mapping with 'names'") from None
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names)]
        if not isinstance(names, list) or not names:
            raise VisionLoraError(f"{path}: 'names' must be a non-empty list or mapping")
        return [str(n) for n in names]
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise VisionLoraError(f"{path}: class-names file is empty")
    return names


FORMAT = DataFormat(
    name="yolo",
    expected="a labels/ folder of YOLO .txt files",
    finds=lambda path: path.is_dir() and bool(find_yolo_labels(path)),
    read=read_yolo,
)
