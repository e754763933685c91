"""Top-down pose with a detector: a detection model finds the instance boxes in each image or
frame, then the pose model locates the keypoints in each box (``--detector``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from visionlora.deploy.predictor import LoadedRun, load_run
from visionlora.errors import VisionLoraError


@dataclass
class BoxFinder:
    """The boxes a detection model finds, above ``threshold``, of ``label`` when given, and at
    most ``max_instances`` of them (the highest scoring) when given."""

    detector: LoadedRun
    threshold: float = 0.5
    label: str | None = None
    max_instances: int | None = None

    def boxes(self, images: Sequence[Image.Image]) -> list[list[list[float]]]:
        found = self.detector.predict(list(images), threshold=self.threshold)
        kept = [sorted((box for box in prediction["boxes"] if self.label is None or box["label"] == self.label),
                       key=lambda box: -box["score"])[: self.max_instances] for prediction in found]
        return [[box["box"] for box in boxes] for boxes in kept]


def load_detector(ref: str, threshold: float = 0.5, label: str | None = None, max_instances: int | None = None,
                  **loading: Any) -> BoxFinder:
    """A :class:`BoxFinder` over a visionlora detection run or export, or a hub detector."""
    if not 0.0 <= threshold <= 1.0:
        raise VisionLoraError(f"--detector-threshold must be between 0 and 1, not {threshold:g}")
    if max_instances is not None and max_instances < 1:
        raise VisionLoraError(f"--max-instances must be 1 or more, not {max_instances}")
    detector = load_run(ref, **loading) if Path(ref).exists() else hub_detector(ref, **loading)
    if detector.info.task != "detection":
        raise VisionLoraError(f"--detector {ref}: not a detection model (it is a {detector.info.task} run)")
    if label is not None and label not in detector.info.labels:
        known = ", ".join(detector.info.labels[:20])
        raise VisionLoraError(f"--detector-label {label}: {ref} finds no such label (it finds: {known})")
    return BoxFinder(detector, threshold, label, max_instances)


def hub_detector(ref: str, allow_pickle: bool = False, trust_remote_code: bool = False, **_: Any) -> LoadedRun:
    """A hub object-detection model (e.g. ``PekingU/rtdetr_v2_r18vd``) as a run, with its own labels."""
    import torch

    from visionlora.data.transforms import processor_size
    from visionlora.modeling.loading import load_pretrained, loading_policy
    from visionlora.tasks import get_task
    from visionlora.tasks.base import ModelInfo

    task = get_task("detection")
    with loading_policy(allow_pickle, trust_remote_code):
        checkpoint, check = task.checkpoint(ref)
        model, processor = load_pretrained(task._auto_class(), checkpoint, loading_check=check)
    config = model.config
    labels = [str(config.id2label[i]) for i in range(len(config.id2label))]
    info = ModelInfo("detection", "full", ref, labels, processor_size(processor))
    task.describe_model(model, processor, info)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return LoadedRun(None, task, model, processor, info)


def topdown(pose: LoadedRun, finder: BoxFinder, options: dict[str, Any]):
    """A predict function for images: the detector's boxes, then pose in each box."""

    def predict(images: list[Image.Image]) -> list[dict[str, Any]]:
        return pose.predict(images, **{**options, "boxes": finder.boxes(images)})

    return predict
