"""The five roles of a task, each a class of hooks with defaults; a task subclasses those it changes."""

from visionlora.tasks.roles.data import TaskData
from visionlora.tasks.roles.model import TaskModel
from visionlora.tasks.roles.prediction import TaskPrediction
from visionlora.tasks.roles.report import TaskReport
from visionlora.tasks.roles.steps import TaskSteps

__all__ = ["TaskData", "TaskModel", "TaskPrediction", "TaskReport", "TaskSteps"]
