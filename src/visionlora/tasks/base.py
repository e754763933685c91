"""The task contract's records and declarations.

A task is a short list of answers: declarations (its name, preset, formats, metric, options and
writers) and five roles, each a class of hooks with defaults (:mod:`visionlora.tasks.roles`):

- ``data`` (:class:`~visionlora.tasks.roles.data.TaskData`): read the annotations, check them,
  build the training and evaluation datasets, and the state the data teaches the run;
- ``model`` (:class:`~visionlora.tasks.roles.model.TaskModel`): build or load the model, the
  facts read off it, its head modules, its training mode;
- ``steps`` (:class:`~visionlora.tasks.roles.steps.TaskSteps`): batches, the loss, an evaluation
  step and the metrics;
- ``prediction`` (:class:`~visionlora.tasks.roles.prediction.TaskPrediction`): model inputs of an
  image, decoding outputs into JSON-ready results, drawing them;
- ``report`` (:class:`~visionlora.tasks.roles.report.TaskReport`): per-class rows and plots,
  ground truth shaped like a prediction, captions.

The loops that drive these hooks are the engines': training (:mod:`visionlora.training.engine`),
evaluation and prediction (:mod:`visionlora.deploy.evaluation`, :mod:`visionlora.deploy.prediction`).
"""

from __future__ import annotations

from typing import ClassVar

from visionlora.tasks.records import (
    BoxRequest,
    Datasets,
    DemoRecipe,
    Diagnostics,
    Evaluation,
    LabelIssue,
    ModelFacts,
    ModelInfo,
    PredictInput,
    Preset,
    SeededDataset,
    TaskDeclarations,
    TaskState,
)
from visionlora.tasks.roles import TaskData, TaskModel, TaskPrediction, TaskReport, TaskSteps

__all__ = [
    "BoxRequest",
    "Datasets",
    "DemoRecipe",
    "Diagnostics",
    "Evaluation",
    "LabelIssue",
    "ModelFacts",
    "ModelInfo",
    "PredictInput",
    "Preset",
    "SeededDataset",
    "TaskDeclarations",
    "TaskState",
    "Task",
]


class Task(TaskDeclarations):
    """A task: its declarations, and its five roles (built from the role classes it names)."""

    # the role classes; a task names its own subclasses where it differs from the defaults
    data_role: ClassVar[type[TaskData]] = TaskData
    model_role: ClassVar[type[TaskModel]] = TaskModel
    steps_role: ClassVar[type[TaskSteps]] = TaskSteps
    prediction_role: ClassVar[type[TaskPrediction]] = TaskPrediction
    report_role: ClassVar[type[TaskReport]] = TaskReport

    def __init__(self) -> None:
        self.data = self.data_role(self)
        self.model = self.model_role(self)
        self.steps = self.steps_role(self)
        self.prediction = self.prediction_role(self)
        self.report = self.report_role(self)
