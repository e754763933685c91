"""Task registry: name -> task object. The engine, CLI, inference and server only use this and the base.

Importing this package is cheap: a task's module (and torch) loads when the task is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from visionlora.errors import VisionLoraError
from visionlora.lazy import import_object
from visionlora.tasks.records import ModelInfo

if TYPE_CHECKING:
    from visionlora.tasks.base import Task

_REGISTRY = {
    "classification": "visionlora.tasks.classification.task:ClassificationTask",
    "detection": "visionlora.tasks.detection.task:DetectionTask",
    "pose": "visionlora.tasks.pose.task:PoseTask",
    "segmentation": "visionlora.tasks.segmentation.task:SegmentationTask",
}
DEFAULT_TASK = "classification"  # what --task is when not given


def task_names() -> list[str]:
    return list(_REGISTRY)


def get_task(name: str) -> Task:
    """Return the task called ``name``, or a clear error listing the known ones."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise VisionLoraError(f"unknown task {name!r}; choose one of: {', '.join(_REGISTRY)}") from None
    return import_object(target)()


def read_model_info(data: dict[str, Any]) -> ModelInfo:
    """A saved run description (``visionlora.json``), with its task's own state."""
    return ModelInfo.from_dict(data, get_task(data["task"]).state_type)
