"""Predictions as pre-labels a labelling tool imports (``visionlora predict --format``).

A task declares the :class:`LabelFormat` it writes. The file structures shared by every task
live here: Label Studio's predictions JSON (each task gives the ``result`` regions of one
prediction), CVAT for images 1.1 XML (each task gives one image's shapes), and a dataset
folder of copied images with annotations beside them (COCO, YOLO, VOC, DeepLabCut).
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from visionlora.artifacts import atomic_dir, atomic_write_bytes
from visionlora.errors import VisionLoraError


@dataclass(frozen=True)
class LabelSource:
    """What a pre-label file says about the model behind it: its version (the run), its labels
    (classes or keypoint names) and the task's own facts about the run (e.g. a skeleton)."""

    model_version: str
    labels: list[str]
    state: dict[str, Any] = field(default_factory=dict)


Write = Callable[[Path, Sequence[dict], Sequence[Image.Image], LabelSource], None]


@dataclass(frozen=True)
class LabelFormat:
    """A labelling tool's import format, chosen with ``--format NAME --output TARGET``."""

    name: str
    help: str
    target: str  # what --output names, e.g. "FILE.json" or "DIR"
    write: Write


# -- Label Studio -----------------------------------------------------------------------------
Regions = Callable[[dict, Image.Image, LabelSource], list[dict]]


@dataclass(frozen=True)
class LabelStudioShape:
    """A task's Label Studio regions: the control tag (``Choices``, ``RectangleLabels``...) its
    results fill, its ``from_name``, and the regions of one prediction."""

    control: str
    from_name: str
    regions: Regions
    child: str = "Label"  # the tag of each label inside the control

    def config(self, labels: Sequence[str]) -> str:
        """A labelling config whose names match the regions written (Label Studio's project setup)."""
        children = "".join(f'\n    <{self.child} value="{_xml_text(name)}"/>' for name in labels)
        return (f'<View>\n  <Image name="{LABEL_STUDIO_IMAGE}" value="$image"/>\n'
                f'  <{self.control} name="{self.from_name}" toName="{LABEL_STUDIO_IMAGE}">{children}\n'
                f'  </{self.control}>\n</View>\n')


LABEL_STUDIO_IMAGE = "image"  # the Image tag's name, every region's to_name


def region(shape: LabelStudioShape, image: Image.Image, value: dict, score: float | None) -> dict:
    """One Label Studio result region of ``shape`` on ``image``."""
    found = {"from_name": shape.from_name, "to_name": LABEL_STUDIO_IMAGE, "type": shape.control.lower(),
             "original_width": image.width, "original_height": image.height, "image_rotation": 0,
             "value": value}
    if score is not None:
        found["score"] = unit_score(score)
    return found


def unit_score(score: float) -> float:
    """A score in [0, 1], as Label Studio takes it (heatmap peaks and raw logits may fall outside)."""
    return min(max(float(score), 0.0), 1.0)


def percent(value: float, whole: int) -> float:
    """``value`` pixels as a percentage of ``whole`` (Label Studio's coordinates)."""
    return 100.0 * float(value) / whole


def label_studio_tasks(predictions: Sequence[dict], images: Sequence[Image.Image], source: LabelSource,
                       shape: LabelStudioShape, score: Callable[[dict], float]) -> list[dict]:
    """Label Studio tasks: the image as given, and the prediction with the run as model version."""
    return [{"data": {"image": prediction["image"]},
             "predictions": [{"model_version": source.model_version, "score": unit_score(score(prediction)),
                              "result": shape.regions(prediction, image, source)}]}
            for prediction, image in zip(predictions, images)]


def label_studio_format(shape: LabelStudioShape, score: Callable[[dict], float]) -> LabelFormat:
    """``--format labelstudio``: a tasks JSON file to import, and the labelling config beside it."""

    def write(target: Path, predictions: Sequence[dict], images: Sequence[Image.Image], source: LabelSource) -> None:
        tasks = label_studio_tasks(predictions, images, source, shape, score)
        write_text(target, json.dumps(tasks, indent=2) + "\n")
        write_text(target.with_suffix(".xml"), shape.config(source.labels))

    return LabelFormat("labelstudio", "Label Studio tasks with predictions (and the labelling config, as "
                       "FILE.xml)", "FILE.json", write)


# -- CVAT for images 1.1 ----------------------------------------------------------------------
Shapes = Callable[[ET.Element, dict, Image.Image, LabelSource], None]


def cvat_document(predictions: Sequence[dict], images: Sequence[Image.Image], source: LabelSource,
                  shapes: Shapes, label_type: str) -> ET.Element:
    """CVAT for images 1.1: the labels in ``meta``, then one ``image`` element per prediction."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "name").text = source.model_version
    ET.SubElement(task, "size").text = str(len(predictions))
    ET.SubElement(task, "mode").text = "annotation"
    labels = ET.SubElement(task, "labels")
    for name in source.labels:
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "type").text = label_type
    for number, (prediction, name, image) in enumerate(zip(predictions, unique_names(predictions), images)):
        element = ET.SubElement(root, "image", id=str(number), name=name, width=str(image.width),
                                height=str(image.height))
        shapes(element, prediction, image, source)
    ET.indent(root)
    return root


def cvat_shape(parent: ET.Element, tag: str, label: str, score: float | None, **geometry: str) -> ET.Element:
    """One automatic CVAT shape (``box``, ``points``, ``polygon``, ``tag``), its score as an attribute."""
    attributes = {"label": label, "source": "auto"}
    if tag != "tag":
        attributes.update(occluded="0", **geometry, z_order="0")
    element = ET.SubElement(parent, tag, attributes)
    if score is not None:
        ET.SubElement(element, "attribute", name="score").text = f"{score:.6f}"
    return element


def cvat_format(shapes: Shapes, label_type: str) -> LabelFormat:
    """``--format cvat``: a CVAT for images 1.1 XML file (images named by file name, as uploaded)."""

    def write(target: Path, predictions: Sequence[dict], images: Sequence[Image.Image], source: LabelSource) -> None:
        root = cvat_document(predictions, images, source, shapes, label_type)
        write_text(target, '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n")

    return LabelFormat("cvat", "CVAT for images 1.1 XML (upload the images, then this as annotations)",
                       "FILE.xml", write)


# -- dataset folders --------------------------------------------------------------------------
Fill = Callable[[Path, Sequence[dict], list[str], Sequence[Image.Image], LabelSource], None]


def dataset_format(name: str, help_text: str, fill: Fill, images_under: Callable[[LabelSource], str] | None = None
                   ) -> LabelFormat:
    """A format written as a new folder: the images copied into ``images/`` (or ``images_under``)
    under unique names, and ``fill`` writing the annotations that name them."""

    def write(target: Path, predictions: Sequence[dict], images: Sequence[Image.Image], source: LabelSource) -> None:
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise VisionLoraError(f"--output {target}: already exists; --format {name} writes a new folder")
        names = unique_names(predictions)
        with atomic_dir(target) as folder:
            where = folder / (images_under(source) if images_under else "images")
            where.mkdir(parents=True, exist_ok=True)
            for prediction, file_name in zip(predictions, names):
                shutil.copyfile(prediction["image"], where / file_name)
            fill(folder, predictions, names, images, source)

    return LabelFormat(name, help_text, "DIR", write)


def coco_image(image_id: int, name: str, image: Image.Image) -> dict:
    """A COCO ``images`` entry for a copied image (``images/<name>`` in the dataset folder)."""
    return {"id": image_id, "file_name": f"images/{name}", "width": image.width, "height": image.height}


def coco_box(x0: float, y0: float, x1: float, y1: float) -> dict:
    """COCO's ``bbox`` ([x, y, width, height]), ``area`` and ``iscrowd`` of a box's corners."""
    return {"bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}


def unique_names(predictions: Sequence[dict]) -> list[str]:
    """Each prediction's image file name, numbered (``<stem>-2.jpg``) where names repeat."""
    used: set[str] = set()
    names = []
    for prediction in predictions:
        path = Path(prediction["image"])
        name, number = path.name, 2
        while name in used:
            name, number = f"{path.stem}-{number}{path.suffix}", number + 1
        used.add(name)
        names.append(name)
    return names


def write_text(target: Path, text: str) -> None:
    try:
        atomic_write_bytes(Path(target), text.encode())
    except OSError as err:
        raise VisionLoraError(f"{target}: cannot write: {err.strerror or err}") from None


def _xml_text(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
