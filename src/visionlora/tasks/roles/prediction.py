"""The prediction role: the model inputs an image gives, decoding outputs into JSON-ready
results, combining them per image, and drawing them."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from visionlora.errors import VisionLoraError
from visionlora.tasks.records import BoxRequest, ModelInfo, PredictInput, TaskDeclarations


class TaskPrediction:
    """Hooks: ``predict_inputs``, ``decode``, ``draw`` (required); ``model_inputs``, ``combine``,
    ``box_request``, ``exact_outputs``, ``tracked``, ``hugging_face_answer``, ``uncertainty``,
    ``output_uncertainty`` (defaults)."""

    def __init__(self, task: TaskDeclarations) -> None:
        self.task = task

    def hugging_face_answer(self, prediction: dict[str, Any], info: ModelInfo) -> list[dict[str, Any]]:
        """One prediction (as ``visionlora predict`` gives it) in the shape of the Hugging Face Inference
        API's answer for the task, which ``huggingface_hub.InferenceClient`` parses (hook)."""
        raise NotImplementedError

    def predict_inputs(self, image: Image.Image, image_index: int, processor: Any, info: ModelInfo,
                       options: dict[str, Any]) -> list[PredictInput]:
        """The model inputs one image gives (hook)."""
        raise NotImplementedError

    def model_inputs(self, pixels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch the inputs' pixels for the model (hook; default: stack them)."""
        return {"pixel_values": torch.stack(pixels)}

    def decode(self, outputs: Any, inputs: list[PredictInput], images: Sequence[Image.Image], processor: Any,
               info: ModelInfo, options: dict[str, Any]) -> list[Any]:
        """JSON-ready results, one per input (hook)."""
        raise NotImplementedError

    def combine(self, results: list[Any]) -> dict[str, Any]:
        """One image's prediction from the results of its inputs (hook; default: the one result)."""
        return results[0]

    def default_options(self) -> dict[str, Any]:
        """Each predict option at its default."""
        return {option.name: option.default for option in self.task.predict_options}

    def box_request(self, values: dict[str, Any]) -> BoxRequest | None:
        """From ``box_options``' values, what to ask a box-finding model; None when none is named (hook)."""
        return None

    def draw(self, image: Image.Image, prediction: dict[str, Any], info: ModelInfo) -> Image.Image:
        """A copy of ``image`` with ``prediction`` drawn on it (hook)."""
        raise NotImplementedError

    def tracked(self, prediction: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The items of ``prediction`` a video tracker follows, each a dict with a ``box``
        ([x0, y0, x1, y1]) and optionally a ``score`` and ``label``; None where the task has no
        boxes to follow (hook; default None)."""
        return None

    def exact_outputs(self, model: Any) -> bool:
        """Whether an exported model's raw outputs must equal torch's (hook; False where near-tied
        scores may pick other queries, so only the decoded predictions can agree)."""
        return True

    def output_uncertainty(self, outputs: Any) -> list[float] | None:
        """Each model input's uncertainty in [0, 1] from the raw outputs, where the decoded prediction
        does not carry it (hook; default None: ``uncertainty`` of each prediction is used)."""
        return None

    def uncertainty(self, prediction: dict[str, Any]) -> float:
        """How unsure the model is of one prediction, in [0, 1] (1: least sure): what
        ``visionlora select`` ranks images by (hook; a task without one cannot be ranked)."""
        raise VisionLoraError(f"visionlora select does not rank {self.task.name} predictions yet")

