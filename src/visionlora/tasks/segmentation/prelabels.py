"""Segmentation pre-labels: a COCO dataset folder with each predicted class's pixels as an
uncompressed RLE mask (exact, pixel for pixel), which CVAT's COCO import and ``visionlora train``
read; and each class's regions as polygons (their outlines) for Label Studio and CVAT XML."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
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

COCO_FILE = "annotations.json"


def predicted_mask(prediction: dict) -> np.ndarray:
    """The (H, W) class-id mask of a prediction."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["mask"]))))


def rle(pixels: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a boolean (H, W) mask: run lengths in column order, from a run of 0s."""
    flat = pixels.astype(np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(pixels.shape[0]), int(pixels.shape[1])], "counts": counts}


def _coco_masks(folder: Path, predictions: Sequence[dict], names: list[str], images: Sequence[Image.Image],
                source: LabelSource) -> None:
    """``annotations.json``: a category per class but background (ids from 1), an RLE annotation per
    class present in an image."""
    classes = [(number, label) for number, label in enumerate(source.labels) if number > 0]
    entries: list[dict] = []
    annotations: list[dict] = []
    for image_id, (prediction, name, image) in enumerate(zip(predictions, names, images), start=1):
        entries.append(coco_image(image_id, name, image))
        mask = predicted_mask(prediction)
        for category_id, (number, _) in enumerate(classes, start=1):
            pixels = mask == number
            if not pixels.any():
                continue
            ys, xs = np.nonzero(pixels)
            box = coco_box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                **box, "area": int(pixels.sum()), "segmentation": rle(pixels)})
    categories = [{"id": category_id, "name": label, "supercategory": ""}
                  for category_id, (_, label) in enumerate(classes, start=1)]
    (folder / COCO_FILE).write_text(json.dumps({"images": entries, "annotations": annotations,
                                                "categories": categories}) + "\n")


def class_polygons(mask: np.ndarray, labels: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """(class name, (P, 2) outline in pixels) of each region of each class but background (0)."""
    import cv2

    found = []
    for number, label in enumerate(labels):
        if number == 0:
            continue
        pixels = (mask == number).astype(np.uint8)
        if not pixels.any():
            continue
        contours, _ = cv2.findContours(pixels, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        found += [(label, contour.reshape(-1, 2).astype(np.float64)) for contour in contours if len(contour) >= 3]
    return found


def _polygons(prediction: dict, image: Image.Image, source: LabelSource) -> list[dict]:
    regions = []
    for label, outline in class_polygons(predicted_mask(prediction), source.labels):
        points = [[percent(x, image.width), percent(y, image.height)] for x, y in outline]
        regions.append(region(POLYGONS, image, {"points": points, "closed": True, "polygonlabels": [label]}, None))
    return regions


POLYGONS = LabelStudioShape("PolygonLabels", "label", _polygons)


def _cvat_polygons(element, prediction: dict, image: Image.Image, source: LabelSource) -> None:
    for label, outline in class_polygons(predicted_mask(prediction), source.labels):
        cvat_shape(element, "polygon", label, None, points=";".join(f"{x:.2f},{y:.2f}" for x, y in outline))


def _no_score(prediction: dict) -> float:
    """An image's score: segmentation predictions carry none (``select`` ranks by pixel entropy)."""
    return 1.0


LABEL_FORMATS = (
    dataset_format("coco", "a COCO dataset folder: images/ and annotations.json, each class's predicted pixels an "
                   "RLE mask", _coco_masks),
    label_studio_format(POLYGONS, _no_score),
    cvat_format(_cvat_polygons, "polygon"),
)
