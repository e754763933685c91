"""Pose pre-labels: a DeepLabCut labeled-data folder for ``refine_labels``, COCO keypoints,
Label Studio keypoints and CVAT points."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import yaml
from PIL import Image

from visionlora.artifacts import atomic_write_with
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
from visionlora.tasks.pose.deeplabcut_output import H5_KEY, NA, SCORER

DLC_FOLDER = "predicted"  # the labeled-data/<folder> the frames are copied to
COCO_FILE = "annotations.json"
KEYPOINT_SIZE = 0.6  # a Label Studio keypoint's width, % of the image


def best_instance(prediction: dict) -> dict | None:
    """The instance a single-animal label keeps: the highest scoring."""
    return max(prediction["instances"], key=lambda instance: instance["score"], default=None)


def inside(keypoint: dict, image: Image.Image) -> bool:
    """Whether a predicted keypoint lies in the image (labelling tools take no other)."""
    return 0 <= keypoint["x"] < image.width and 0 <= keypoint["y"] < image.height


def _dlc_table(predictions: Sequence[dict], names: list[str], images: Sequence[Image.Image], source: LabelSource):
    """DeepLabCut's CollectedData: rows indexed (labeled-data, folder, file), x and y per body part."""
    import numpy as np
    import pandas as pd

    columns = pd.MultiIndex.from_product([[SCORER], source.labels, ["x", "y"]],
                                         names=["scorer", "bodyparts", "coords"])
    values = np.full((len(predictions), len(columns)), np.nan)
    for row, (prediction, image) in enumerate(zip(predictions, images)):
        instance = best_instance(prediction)
        if instance is not None:
            values[row] = [v for k in instance["keypoints"]
                           for v in ((k["x"], k["y"]) if inside(k, image) else (np.nan, np.nan))]
    index = pd.MultiIndex.from_tuples([("labeled-data", DLC_FOLDER, name) for name in names])
    return pd.DataFrame(values, columns=columns, index=index)


def _deeplabcut(folder: Path, predictions: Sequence[dict], names: list[str], images: Sequence[Image.Image],
                source: LabelSource) -> None:
    """A single-animal DeepLabCut project's labelled frames: config.yaml, the frames and
    ``CollectedData_visionlora.csv`` (and ``.h5`` where PyTables is installed) in labeled-data/."""
    import importlib.util

    table = _dlc_table(predictions, names, images, source)
    frames = folder / "labeled-data" / DLC_FOLDER
    table.to_csv(frames / f"CollectedData_{SCORER}.csv", na_rep=NA)
    if importlib.util.find_spec("tables") is not None:
        atomic_write_with(frames / f"CollectedData_{SCORER}.h5", lambda path: table.to_hdf(path, key=H5_KEY, mode="w"))
    labels = source.labels
    skeleton = [[labels[a], labels[b]] for a, b in source.state.get("skeleton", [])]
    config = {"Task": source.model_version, "scorer": SCORER, "multianimalproject": False, "bodyparts": labels,
              "skeleton": skeleton, "video_sets": {}, "TrainingFraction": [0.95]}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _coco_keypoints(folder: Path, predictions: Sequence[dict], names: list[str], images: Sequence[Image.Image],
                    source: LabelSource) -> None:
    """``annotations.json``: one category naming the keypoints, one annotation per instance (scored)."""
    skeleton = [[a + 1, b + 1] for a, b in source.state.get("skeleton", [])]
    entries: list[dict] = []
    annotations: list[dict] = []
    for image_id, (prediction, name, image) in enumerate(zip(predictions, names, images), start=1):
        entries.append(coco_image(image_id, name, image))
        for instance in prediction["instances"]:
            flat = [v for k in instance["keypoints"] for v in ((k["x"], k["y"], 2) if inside(k, image) else (0, 0, 0))]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                **coco_box(*instance["box"]), "keypoints": flat,
                                "num_keypoints": sum(1 for v in flat[2::3] if v), "score": instance["score"]})
    category = {"id": 1, "name": "instance", "supercategory": "", "keypoints": source.labels, "skeleton": skeleton}
    (folder / COCO_FILE).write_text(json.dumps({"images": entries, "annotations": annotations,
                                                "categories": [category]}, indent=1) + "\n")


def _keypoints(prediction: dict, image: Image.Image, source: LabelSource) -> list[dict]:
    regions = []
    for instance in prediction["instances"]:
        for k in (k for k in instance["keypoints"] if inside(k, image)):
            value = {"x": percent(k["x"], image.width), "y": percent(k["y"], image.height), "width": KEYPOINT_SIZE,
                     "keypointlabels": [k["name"]]}
            regions.append(region(KEYPOINTS, image, value, k["score"]))
    return regions


KEYPOINTS = LabelStudioShape("KeyPointLabels", "keypoints", _keypoints)


def _points(element: ET.Element, prediction: dict, image: Image.Image, source: LabelSource) -> None:
    for instance in prediction["instances"]:
        for k in (k for k in instance["keypoints"] if inside(k, image)):
            cvat_shape(element, "points", k["name"], k["score"], points=f"{k['x']:.2f},{k['y']:.2f}")


def _least_score(prediction: dict) -> float:
    """An image's score: its least sure keypoint (1 with none)."""
    return min((float(k["score"]) for i in prediction["instances"] for k in i["keypoints"]), default=1.0)


LABEL_FORMATS = (
    dataset_format("deeplabcut", "a DeepLabCut project's labelled frames for refine_labels: config.yaml and "
                   f"labeled-data/{DLC_FOLDER}/ (frames, CollectedData_{SCORER}.csv, .h5 with PyTables); one "
                   "animal per frame, the best scoring", _deeplabcut, lambda source: f"labeled-data/{DLC_FOLDER}"),
    dataset_format("coco", "a COCO keypoints dataset folder: images/ and annotations.json", _coco_keypoints),
    label_studio_format(KEYPOINTS, _least_score),
    cvat_format(_points, "points"),
)
