"""Pascal VOC: one XML file per image, in ``annotations/`` (or beside the images)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from visionlora.data.paths import resolve_image
from visionlora.data.records import DataFormat, DetectionRecord, Part, clean_box
from visionlora.errors import VisionLoraError


def find_voc_xml(folder: Path) -> list[Path]:
    found = sorted((folder / "annotations").glob("*.xml")) or sorted((folder / "Annotations").glob("*.xml"))
    return found or sorted(folder.glob("*.xml"))


def read_voc(folder: Path) -> Part:
    """Read every XML file; images are looked up by ``<filename>`` in the folder or ``images/``."""
    records, names, dropped = [], [], []
    for xml_path in find_voc_xml(folder):
        record, labels, bad = _read_one(folder, xml_path)
        records.append(record)
        names += labels
        dropped += bad
    return Part(records, sorted(set(names)), "voc", str(folder), dropped=dropped)


def _read_one(root: Path, xml_path: Path) -> tuple[DetectionRecord, list[str], list[dict[str, str]]]:
    try:
        tree = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise VisionLoraError(f"{xml_path}: not valid XML ({err})") from None
    filename = (tree.findtext("filename") or "").strip()
    if not filename:
        filename = xml_path.with_suffix(".jpg").name
    image = resolve_image(root, filename, str(xml_path), search=("", "images", "JPEGImages"))
    width, height = _size(tree)
    record = DetectionRecord(str(image), source=str(xml_path))
    labels, dropped = [], []
    for index, obj in enumerate(tree.findall("object")):
        name = (obj.findtext("name") or "").strip()
        where = f"{xml_path}: object {index + 1}"
        if not name:
            raise VisionLoraError(f"{where}: has no <name>")
        box = _box(obj, where)
        cleaned = clean_box(box, width, height)
        if cleaned is None:
            dropped.append({"annotation": where, "reason": f"zero-area or invalid box {box}"})
            continue
        record.boxes.append(cleaned)
        record.labels.append(name)
        labels.append(name)
    return record, labels, dropped


def _size(tree: ET.Element) -> tuple[float | None, float | None]:
    width_text, height_text = tree.findtext("size/width"), tree.findtext("size/height")
    if width_text is None or height_text is None:
        return None, None
    try:
        width, height = float(width_text), float(height_text)
    except ValueError:
        return None, None
    return (width, height) if width > 0 and height > 0 else (None, None)


def _box(obj: ET.Element, where: str) -> list[float]:
    values = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        text = obj.findtext(f"bndbox/{tag}")
        try:
            values.append(float(text if text is not None else ""))
        except ValueError:
            raise VisionLoraError(f"{where}: <bndbox><{tag}> is {text!r}, not a number") from None
    return values


FORMAT = DataFormat(
    name="voc",
    expected="an annotations/ folder of Pascal VOC .xml files",
    finds=lambda path: path.is_dir() and bool(find_voc_xml(path)),
    read=read_voc,
)
