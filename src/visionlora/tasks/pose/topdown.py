"""Top-down pose with a detector: a detection model finds the instance boxes in each image or
frame, then the pose model locates the keypoints in each box.

The pose task declares these options (``--detector`` and friends on the command line, the
same names as form fields of the server); ``predict``, videos and the server all ask the
detector and keep its boxes through :class:`DetectorRequest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from visionlora.core.outputs import Option, parse_float_between
from visionlora.errors import VisionLoraError
from visionlora.tasks.base import BoxRequest, ModelInfo

DETECTOR_TASK = "detection"


def parse_instance_count(text: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise VisionLoraError(f"max_instances must be a whole number, not {text!r}") from None
    if value < 1:
        raise VisionLoraError(f"max_instances must be 1 or more, not {value}")
    return value


DETECTOR_OPTIONS = (
    Option("detector", "a detection run, merged export or hub detector (the server: a served detection model's "
           "name) whose boxes pose runs in, one instance per box", str, None, "RUN_OR_ID"),
    Option("detector_threshold", "keep detections scoring at least this (default 0.5)",
           parse_float_between(0.0, 1.0, "detector_threshold"), 0.5, "SCORE"),
    Option("detector_label", "keep only detections of this label", str, None, "LABEL"),
    Option("max_instances", "keep the N highest-scoring boxes per image", parse_instance_count, None, "N"),
)


@dataclass(frozen=True)
class DetectorRequest(BoxRequest):
    """The boxes a detection model finds, above ``threshold``, of ``label`` when given, and at
    most ``max_instances`` of them (the highest scoring) when given."""

    model: str
    threshold: float = 0.5
    label: str | None = None
    max_instances: int | None = None
    model_task: str = DETECTOR_TASK
    option: str = "boxes"

    @classmethod
    def from_options(cls, values: dict[str, Any]) -> DetectorRequest | None:
        """The request the option values given make; None when no detector is named (the others alone are an error)."""
        given = [name for name, value in values.items() if value is not None]
        if values.get("detector") is None:
            if given:
                raise VisionLoraError(f"'{given[0]}' needs a detector ('detector': a detection model)")
            return None
        fields = {"detector_threshold": "threshold", "detector_label": "label", "max_instances": "max_instances"}
        return cls(values["detector"], **{field: values[name] for name, field in fields.items()
                                          if values.get(name) is not None})

    def check(self, info: ModelInfo, name: str) -> None:
        if info.task != DETECTOR_TASK:
            raise VisionLoraError(f"detector {name!r} is a {info.task} model, not a detection model")
        if self.label is not None and self.label not in info.labels:
            raise VisionLoraError(f"detector {name!r} finds no label {self.label!r} "
                                  f"(it finds: {', '.join(info.labels[:20])})")

    def model_options(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def keep(self, predictions: list[dict[str, Any]]) -> list[list[list[float]]]:
        return [[box["box"] for box in boxes] for boxes in self._kept(predictions)]

    def options(self, predictions: list[dict[str, Any]]) -> dict[str, Any]:
        """The kept boxes, and their scores as ``box_scores`` (each instance's score)."""
        kept = self._kept(predictions)
        return {self.option: [[box["box"] for box in boxes] for boxes in kept],
                "box_scores": [[box["score"] for box in boxes] for boxes in kept]}

    def _kept(self, predictions: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        return [sorted((box for box in prediction["boxes"] if self.label is None or box["label"] == self.label),
                       key=lambda box: -box["score"])[: self.max_instances] for prediction in predictions]
