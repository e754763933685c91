"""The steps role: batches, the training loss, one evaluation step and the metrics."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from visionlora.data.batches import stacked
from visionlora.data.transforms import Normalizer
from visionlora.tasks.records import ModelInfo, TaskDeclarations


class TaskSteps:
    """Hooks: ``loss``, ``eval_step``, ``metrics`` (required); ``collate``, ``device_batch``, ``top1`` (defaults)."""

    def __init__(self, task: TaskDeclarations) -> None:
        self.task = task

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Stack dataset items into a batch (hook; default: stack every field with ``stacked``, which
        in a loader worker stacks into reused shared memory)."""
        return {key: stacked([torch.as_tensor(item[key]) for item in items], key) for key in items[0]}

    def device_batch(self, batch: dict[str, Any], normalizer: Normalizer) -> dict[str, Any]:
        """A loader batch, now on the model's device, made model-ready: its uint8 ``pixel_values``
        normalised in float32 (hook: tasks with other compact fields widen them too)."""
        batch["pixel_values"] = normalizer(batch["pixel_values"])
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], info: ModelInfo) -> torch.Tensor:
        """The training loss of one (``device_batch``-ready) batch (hook)."""
        raise NotImplementedError

    def eval_step(self, model: torch.nn.Module, batch: dict[str, Any], processor: Any,
                  info: ModelInfo) -> tuple[torch.Tensor | None, list[Any]]:
        """(mean loss of the batch, or None for a model that computes none; one output per item) (hook)."""
        raise NotImplementedError

    def metrics(self, dataset: Any, indices: list[int], outputs: list[Any], info: ModelInfo) -> dict[str, Any]:
        """Metrics of the outputs for the dataset items ``indices``, in that order (hook)."""
        raise NotImplementedError

    def top1(self, output: torch.Tensor) -> torch.Tensor:
        """The discrete choices in a model output (the first of ``output_names``), to count how often two
        models agree (hook; default: the largest entry along the last axis, the class per image or query)."""
        return output.argmax(dim=-1)
