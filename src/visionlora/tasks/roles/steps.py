"""The steps role: batches, the training loss, one evaluation step and the metrics."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from visionlora.data.batches import stacked
from visionlora.data.transforms import Normalizer
from visionlora.tasks.records import ModelInfo, TaskDeclarations


class TaskSteps:
    """Hooks: ``loss_of_outputs`` (or ``loss``), ``eval_step``, ``metrics`` (required); ``collate``,
    ``device_batch``, ``forward``, ``top1`` (defaults).

    A task whose loss is a function of each row's outputs (``loss_of_outputs``) trains packed: the rows
    of several jobs go through one forward, and each job's loss is taken from its own rows. A task whose
    model computes its loss over the batch as a whole overrides ``loss`` and says why it cannot pack.
    """

    packing_refusal: str | None = None  # why this task's jobs cannot share a forward, or None

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

    def forward(self, model: torch.nn.Module, batch: dict[str, Any], info: ModelInfo) -> Any:
        """The model's outputs for a (``device_batch``-ready) batch, given its pixels alone (hook)."""
        return model(pixel_values=batch["pixel_values"], **info.forward_kwargs)

    def loss_of_outputs(self, outputs: Any, batch: dict[str, Any], info: ModelInfo) -> torch.Tensor:
        """The training loss of a batch from the model's outputs for its rows (hook)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], info: ModelInfo) -> torch.Tensor:
        """The training loss of one (``device_batch``-ready) batch (hook; default: ``loss_of_outputs``
        of ``forward``)."""
        return self.loss_of_outputs(self.forward(model, batch, info), batch, info)

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
