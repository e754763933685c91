"""The answers other clients expect: one prediction (as ``visionlora predict`` gives it) in the shape of
the Hugging Face Inference API, which ``huggingface_hub.InferenceClient`` parses.

- classification: ``[{"label", "score"}, ...]``, best first (``top_k`` and ``function_to_apply`` are
  the task's own options);
- detection: ``[{"label", "score", "box": {"xmin", "ymin", "xmax", "ymax"}}, ...]``, integer pixels
  (``threshold`` is the task's option);
- segmentation: ``[{"label", "score": null, "mask": BASE64_PNG}, ...]``, one black-and-white mask per
  class present, as transformers' semantic segmentation pipeline answers;
- pose (no Hugging Face task): ``[{"box": {...}, "keypoints": [{"label", "x", "y", "score"}, ...]}, ...]``,
  one item per instance, in the detection answer's spirit.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Callable

import numpy as np
from PIL import Image

from visionlora.core.outputs import png_bytes
from visionlora.tasks.base import ModelInfo


def hugging_face_answer(task: str, prediction: dict[str, Any], info: ModelInfo) -> list[dict[str, Any]]:
    """``prediction`` (of a run of ``task``) as the Hugging Face Inference API answers it."""
    return _SHAPES[task](prediction, info)


def _classification(prediction: dict[str, Any], info: ModelInfo) -> list[dict[str, Any]]:
    return [{"label": ranked["label"], "score": ranked["score"]} for ranked in prediction["top_k"]]


def _pixel_box(box: list[float]) -> dict[str, int]:
    """``[x0, y0, x1, y1]`` as Hugging Face's box: integer pixels by name."""
    return dict(zip(("xmin", "ymin", "xmax", "ymax"), (int(round(v)) for v in box)))


def _detection(prediction: dict[str, Any], info: ModelInfo) -> list[dict[str, Any]]:
    return [{"label": found["label"], "score": found["score"], "box": _pixel_box(found["box"])}
            for found in prediction["boxes"]]


def _segmentation(prediction: dict[str, Any], info: ModelInfo) -> list[dict[str, Any]]:
    """A mask per class present (255 where the class is, 0 elsewhere), in label order."""
    classes = np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["mask"]))))
    answers = []
    for index, label in enumerate(info.labels):
        if label in prediction["areas"]:
            mask = Image.fromarray(np.where(classes == index, 255, 0).astype(np.uint8), mode="L")
            answers.append({"label": label, "score": None, "mask": base64.b64encode(png_bytes(mask)).decode()})
    return answers


def _pose(prediction: dict[str, Any], info: ModelInfo) -> list[dict[str, Any]]:
    return [{"box": _pixel_box(instance["box"]),
             "keypoints": [{"label": k["name"], "x": k["x"], "y": k["y"], "score": k["score"]}
                           for k in instance["keypoints"]]}
            for instance in prediction["instances"]]


_SHAPES: dict[str, Callable[[dict[str, Any], ModelInfo], list[dict[str, Any]]]] = {
    "classification": _classification, "detection": _detection, "segmentation": _segmentation, "pose": _pose}
