"""The evaluation loop: a task's evaluation steps over a data loader, gathered across processes."""

from __future__ import annotations

from typing import Any

import torch

from visionlora.data.transforms import Normalizer
from visionlora.tasks.base import Evaluation, ModelInfo, Task


def evaluate(task: Task, model: torch.nn.Module, processor: Any, loader: Any, accelerator: Any,
             info: ModelInfo) -> dict[str, Any]:
    """Metrics over ``loader``, gathered across processes by dataset index, with ``loss``."""
    return evaluate_outputs(task, model, processor, loader, accelerator, info).metrics


@torch.inference_mode()
def evaluate_outputs(task: Task, model: torch.nn.Module, processor: Any, loader: Any, accelerator: Any,
                     info: ModelInfo) -> Evaluation:
    """``evaluate``'s metrics with the outputs behind them, in dataset order, in every process."""
    model.eval()
    normalizer = Normalizer(processor)
    found: dict[int, tuple[Any, float | None]] = {}
    for batch in loader:
        loss, outputs = task.steps.eval_step(model, task.steps.device_batch(batch, normalizer), processor, info)
        batch_loss = None if loss is None else float(loss)  # an exported model computes no loss
        rows = [(int(i), out, batch_loss) for i, out in zip(batch["index"].tolist(), outputs)]
        for index, output, row_loss in accelerator.gather_for_metrics(rows, use_gather_object=True):
            found[index] = (output, row_loss)
    indices = sorted(found)
    outputs = [found[i][0] for i in indices]
    losses = [found[i][1] for i in indices]
    metrics: dict[str, Any] = {}
    if None not in losses:
        metrics["loss"] = sum(loss for loss in losses if loss is not None) / max(len(indices), 1)
    metrics.update(task.steps.metrics(dataset_behind(loader), indices, outputs, info))
    return Evaluation(metrics, indices, outputs)


def dataset_behind(loader: Any) -> torch.utils.data.Dataset:
    """The dataset a (possibly wrapped or sharded) data loader reads from."""
    dataset = loader.dataset
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset
