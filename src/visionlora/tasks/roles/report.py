"""The report role: what a run's validation outputs show (per-class rows and plots), and the
ground truth shaped like a prediction for the grid of examples."""

from __future__ import annotations

from typing import Any

from PIL import Image

from visionlora.errors import VisionLoraError
from visionlora.tasks.records import Diagnostics, LabelIssue, ModelInfo, TaskDeclarations


class TaskReport:
    """Hooks: ``ground_truth`` (required); ``diagnostics``, ``evaluated_predictions``, ``caption``,
    ``out_of_sample_options``, ``label_issues`` (defaults)."""

    def __init__(self, task: TaskDeclarations) -> None:
        self.task = task

    def diagnostics(self, dataset: Any, indices: list[int], outputs: list[Any], info: ModelInfo) -> Diagnostics:
        """Per-class rows and plots of validation outputs, as ``metrics`` gets them (hook)."""
        return Diagnostics()

    def ground_truth(self, record: Any, image: Image.Image, info: ModelInfo) -> tuple[dict[str, Any], dict[str, Any]]:
        """(a record's labels shaped like a prediction, so ``draw`` shows them; the predict
        options that ask about the same instances) (hook)."""
        raise NotImplementedError

    def evaluated_predictions(self, dataset: Any, indices: list[int], outputs: list[Any],
                              info: ModelInfo) -> dict[int, dict[str, Any]] | None:
        """The predictions that validation outputs already are, keyed by each record's position
        among the validation records, so the grid of examples need not predict them again (hook;
        default None: the outputs are not whole predictions, and the grid predicts its images)."""
        return None

    def caption(self, prediction: dict[str, Any]) -> str:
        """A short text for a prediction under its drawing in the grid (hook; default none)."""
        return ""

    def out_of_sample_options(self, info: ModelInfo) -> dict[str, Any]:
        """The predict options of the out-of-sample predictions ``label_issues`` scores (hook; default none)."""
        return {}

    def label_issues(self, records: list[Any], predictions: list[dict[str, Any]], info: ModelInfo) -> list[LabelIssue]:
        """Each record's labels scored against its out-of-sample prediction, in order, for
        ``visionlora check --label-errors`` (hook; default: the task has no such score)."""
        raise VisionLoraError(f"--label-errors is not available for {self.task.name}")
