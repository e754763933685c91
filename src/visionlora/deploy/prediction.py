"""The prediction loop: images to model inputs, batched forwards (adapters mixed where views name
them), decoded per view, combined per image."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from PIL import Image

from visionlora.modeling.mixed_batches import BASE_ROWS, index_tensors, mixed_rows, select_rows
from visionlora.tasks.base import ModelInfo, PredictInput, Task

PREPARED = "prepared"  # the keyword of the inputs made ahead by :func:`prepared_inputs`, one list per image


@dataclass(frozen=True, eq=False)
class PredictView:
    """How one image is predicted in a mixed batch: the adapter (None: the model as it is), the
    processor preparing it and the run description decoding it."""

    adapter: str | None
    processor: Any
    info: ModelInfo
    batch_key: str = ""  # views with equal keys preprocess alike (same input size) and share forwards
    decode_key: str = ""  # views with equal keys (not empty) decode alike: their rows decode together


def predict(task: Task, model: Any, processor: Any, images: Sequence[Image.Image], info: ModelInfo,
            prepared: Sequence[list[PredictInput]] | None = None, **options: Any) -> list[dict]:
    """JSON-ready predictions for RGB images, batched ``predict_batch`` inputs at a time (``prepared``:
    see :func:`predict_mixed`)."""
    return predict_mixed(task, model, images, [PredictView(None, processor, info)] * len(images), prepared,
                         **options)


def prepared_inputs(task: Task, images: Sequence[Image.Image], views: Sequence[PredictView],
                    **options: Any) -> list[list[PredictInput]]:
    """Each image's model inputs (resized and normalised pixels), as :func:`predict_mixed` makes them: made
    ahead (e.g. in another thread while a forward runs) and handed to it as ``prepared``."""
    options = {**task.prediction.default_options(), **options}
    return [task.prediction.predict_inputs(image, index, view.processor, view.info, options)
            for index, (image, view) in enumerate(zip(images, views))]


@torch.inference_mode()
def predict_mixed(task: Task, model: Any, images: Sequence[Image.Image], views: Sequence[PredictView],
                  prepared: Sequence[list[PredictInput]] | None = None, **options: Any) -> list[dict]:
    """Predictions for ``images``, each by its own view (adapter, processor, labels) of one model.

    Inputs whose views preprocess alike share forwards; views naming adapters run them as
    a mixed-adapter batch (``adapter_names``), and each view's rows decode with its own labels.
    ``prepared``: each image's inputs made by :func:`prepared_inputs` with the same options (each
    list's image indices counting from its own image set: they are renumbered here), else made now.
    """
    if getattr(model, "training", True):  # eval() walks every module: only when needed
        model.eval()
    options = {**task.prediction.default_options(), **options}
    if prepared is None:
        prepared = prepared_inputs(task, images, views, **options)
    inputs = [item if item.image_index == index else replace(item, image_index=index)
              for index, items in enumerate(prepared) for item in items]
    per_image: list[list[Any]] = [[] for _ in images]
    for chunk in _chunks(inputs, views, task.predict_batch):
        for item, result in _predict_chunk(task, model, chunk, views, images, options):
            per_image[item.image_index].append(result)
    return [task.prediction.combine(results) for results in per_image]


def _predict_chunk(task: Task, model: Any, chunk: list[PredictInput], views: Sequence[PredictView],
                   images: Sequence[Image.Image], options: dict[str, Any]) -> list[tuple[PredictInput, Any]]:
    """(input, result) for one batched forward of ``chunk``, decoded by each input's view."""
    chunk_views = [views[item.image_index] for item in chunk]
    pixels = task.prediction.model_inputs([item.pixel_values for item in chunk])
    batch = {key: value.to(model.device) for key, value in pixels.items()}
    adapters = [view.adapter for view in chunk_views]
    names = [adapter if adapter is not None else BASE_ROWS for adapter in adapters]  # None: the model as it is
    with mixed_rows(model, names, by_runs=False) if adapters[0] is not None else nullcontext():
        outputs = model(**batch, **chunk_views[0].info.forward_kwargs)
    results = []
    by_view = _rows_by_view(chunk_views)
    # each view's rows of the outputs, indexed on the model's device (one copy from the host for the chunk)
    indices = index_tensors([rows for _, rows in by_view], model.device) if len(by_view) > 1 else [None]
    for (view, rows), index in zip(by_view, indices):
        part = outputs if index is None else select_rows(outputs, index, len(chunk))
        items = [chunk[row] for row in rows]
        results += list(zip(items, task.prediction.decode(part, items, images, view.processor, view.info, options)))
    return results


def _chunks(inputs: list[PredictInput], views: Sequence[PredictView], size: int) -> list[list[PredictInput]]:
    """Inputs in order, grouped by their view's batch key, at most ``size`` a chunk."""
    groups: dict[str, list[PredictInput]] = {}
    for item in inputs:
        groups.setdefault(views[item.image_index].batch_key, []).append(item)
    return [group[start : start + size] for group in groups.values() for start in range(0, len(group), size)]


def _rows_by_view(views: list[PredictView]) -> list[tuple[PredictView, list[int]]]:
    """The rows of each view, those of views that decode alike (e.g. adapters with one label set) together."""
    rows: dict[str | int, tuple[PredictView, list[int]]] = {}
    for row, view in enumerate(views):
        rows.setdefault(view.decode_key or id(view), (view, []))[1].append(row)
    return list(rows.values())
