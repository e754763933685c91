"""Detection pre-labels: boxes as COCO, YOLO and Pascal VOC dataset folders, Label Studio
rectangles and CVAT boxes, each with its score where the format holds one."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

from PIL import Image

from visionlora.core.labelling import (
    LabelSource,
    LabelStudioShape,
    coco_box,
    coco_image,
    cvat_format,
    cvat_shape,
    dataset_format,
    label_studio_format,
    percent,
    region,
)
from visionlora.data.records import clean_box

COCO_FILE = "annotations.json"
YOLO_NAMES = "classes.txt"


def kept_boxes(prediction: dict, image: Image.Image) -> list[tuple[dict, list[float]]]:
    """Each box (found, [x0, y0, x1, y1]) clipped to the image, as labelling tools take them; boxes
    with nothing of positive area inside are left out."""
    kept = []
    for found in prediction["boxes"]:
        box = clean_box(found["box"], image.width, image.height)
        if box is not None:
            kept.append((found, box))
    return kept


def _coco(folder: Path, predictions: Sequence[dict], names: list[str], images: Sequence[Image.Image],
          source: LabelSource) -> None:
    """``annotations.json``: every label a category (ids from 1), each box an annotation with its score."""
    ids = {label: number for number, label in enumerate(source.labels, start=1)}
    entries: list[dict] = []
    annotations: list[dict] = []
    for image_id, (prediction, name, image) in enumerate(zip(predictions, names, images), start=1):
        entries.append(coco_image(image_id, name, image))
        for found, box in kept_boxes(prediction, image):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[found["label"]],
                                **coco_box(*box), "score": found["score"]})
    categories = [{"id": number, "name": label, "supercategory": ""} for label, number in ids.items()]
    (folder / COCO_FILE).write_text(json.dumps({"images": entries, "annotations": annotations,
                                                "categories": categories}, indent=1) + "\n")


def _yolo(folder: Path, predictions: Sequence[dict], names: list[str], images: Sequence[Image.Image],
          source: LabelSource) -> None:
    """``labels/<stem>.txt`` (``class cx cy w h`` normalised, one line a box) and ``classes.txt``."""
    (folder / YOLO_NAMES).write_text("".join(f"{label}\n" for label in source.labels))
    (folder / "labels").mkdir()
    for prediction, name, image in zip(predictions, names, images):
        lines = []
        for found, (x0, y0, x1, y1) in kept_boxes(prediction, image):
            values = ((x0 + x1) / 2 / image.width, (y0 + y1) / 2 / image.height, (x1 - x0) / image.width,
                      (y1 - y0) / image.height)
            lines.append(" ".join([str(source.labels.index(found["label"])), *(f"{v:.6f}" for v in values)]))
        (folder / "labels" / f"{Path(name).stem}.txt").write_text("".join(line + "\n" for line in lines))


def _voc(folder: Path, predictions: Sequence[dict], names: list[str], images: Sequence[Image.Image],
         source: LabelSource) -> None:
    """``annotations/<stem>.xml`` per image, Pascal VOC (the score in each object's ``<score>``)."""
    (folder / "annotations").mkdir()
    for prediction, name, image in zip(predictions, names, images):
        root = ET.Element("annotation")
        ET.SubElement(root, "folder").text = "images"
        ET.SubElement(root, "filename").text = name
        size = ET.SubElement(root, "size")
        for tag, value in (("width", image.width), ("height", image.height), ("depth", 3)):
            ET.SubElement(size, tag).text = str(value)
        for found, corners in kept_boxes(prediction, image):
            item = ET.SubElement(root, "object")
            ET.SubElement(item, "name").text = found["label"]
            ET.SubElement(item, "difficult").text = "0"
            ET.SubElement(item, "score").text = f"{found['score']:.6f}"
            box = ET.SubElement(item, "bndbox")
            for tag, corner in zip(("xmin", "ymin", "xmax", "ymax"), corners):
                ET.SubElement(box, tag).text = f"{corner:.2f}"
        ET.indent(root)
        (folder / "annotations" / f"{Path(name).stem}.xml").write_text(ET.tostring(root, encoding="unicode") + "\n")


def _rectangles(prediction: dict, image: Image.Image, source: LabelSource) -> list[dict]:
    regions = []
    for found, (x0, y0, x1, y1) in kept_boxes(prediction, image):
        value = {"x": percent(x0, image.width), "y": percent(y0, image.height), "width": percent(x1 - x0, image.width),
                 "height": percent(y1 - y0, image.height), "rotation": 0, "rectanglelabels": [found["label"]]}
        regions.append(region(RECTANGLES, image, value, found["score"]))
    return regions


RECTANGLES = LabelStudioShape("RectangleLabels", "label", _rectangles)


def _boxes(element: ET.Element, prediction: dict, image: Image.Image, source: LabelSource) -> None:
    for found, box in kept_boxes(prediction, image):
        corners = dict(zip(("xtl", "ytl", "xbr", "ybr"), (f"{v:.2f}" for v in box)))
        cvat_shape(element, "box", found["label"], found["score"], **corners)


def _least_score(prediction: dict) -> float:
    """An image's score: its least sure box (1 with none), so the doubtful images sort first."""
    return min((float(found["score"]) for found in prediction["boxes"]), default=1.0)


LABEL_FORMATS = (
    dataset_format("coco", "a COCO dataset folder: images/ and annotations.json (scores in each annotation)", _coco),
    dataset_format("yolo", "a YOLO dataset folder: images/, labels/*.txt and classes.txt", _yolo),
    dataset_format("voc", "a Pascal VOC folder: images/ and annotations/*.xml", _voc),
    label_studio_format(RECTANGLES, _least_score),
    cvat_format(_boxes, "rectangle"),
)
