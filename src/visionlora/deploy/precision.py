"""The precision a model predicts in: fp32, or bf16 weights where the device runs bf16 natively.

``auto`` follows training's ``--mixed-precision auto`` (:func:`visionlora.runtime.resolve_precision_on`:
AMX or AVX512-BF16 CPUs unless ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below them, CUDA GPUs of compute
capability 8.0+), and checks the run in bf16 against fp32 on a handful of its own validation
images (generated ones where the run folder has none). Past :data:`MIN_TOP1_AGREEMENT` or
:data:`MAX_ABS_DIFF` the model keeps its fp32 weights, with one line saying why.

The weights themselves are cast to bf16 (the frozen base and the adapters alike), not autocast:
autocast casts every weight again at every forward. The model takes fp32 inputs and gives fp32
outputs as before (hooks cast at its edges), so the prediction code is the same in both.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from visionlora.artifacts import read_json
from visionlora.data.images import UnreadableImage, load_rgb
from visionlora.data.records import image_source
from visionlora.errors import VisionLoraError
from visionlora.runtime import resolve_precision_on
from visionlora.tasks.base import ModelInfo, Task

PRECISIONS = ("auto", "fp32", "bf16")  # what --precision takes
CHECK_IMAGES = 8  # images auto compares bf16 against fp32 on
MIN_TOP1_AGREEMENT = 0.875  # auto keeps fp32 below this top-1 agreement (7 of 8 images)...
MAX_ABS_DIFF = 0.25  # ...or above this largest output difference (logits, boxes)
_EDGES = "_visionlora_bf16_edges"  # the hook handles of a model cast to bf16


@dataclass(frozen=True)
class Precision:
    """The precision a model runs in, why, and (for auto's bf16) how it compared with fp32."""

    name: str  # fp32 or bf16 (int8 for an ONNX model quantized so)
    why: str
    check: dict[str, Any] | None = None  # images, source, top1_agreement, max_abs_diff, limits

    def line(self) -> str:
        """One line: the precision, why, and the check's figures."""
        text = f"{self.name} ({self.why})"
        if self.check:
            c = self.check
            text += (f"; bf16 against fp32 on {c['images']} {c['source']} images: top-1 agreement "
                     f"{c['top1_agreement']:.1%}, max |diff| {c['max_abs_diff']:.3g}")
        return text

    def describe(self) -> dict[str, Any]:
        return {"precision": self.name, "precision_reason": self.why, "precision_check": self.check}


FP32 = Precision("fp32", "the default")


def choose_precision(requested: str, device: torch.device) -> Precision:
    """fp32 or bf16 for ``--precision requested`` on ``device`` (auto: bf16 where it is native)."""
    if requested not in PRECISIONS:
        raise VisionLoraError(f"--precision {requested}: choose one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return Precision(requested, "asked for with --precision")
    precision, why = resolve_precision_on(device, "auto")
    if precision == "fp16":
        why += " (predictions keep fp32 there)"
    return Precision("bf16" if precision == "bf16" else "fp32", why)


def settle_precision(model: Any, requested: str, task: Task, processor: Any, info: ModelInfo,
                     run_images: Callable[[], list[Image.Image] | None], name: str = "the model") -> Precision:
    """Put the torch ``model`` in the precision ``requested`` names (see the module's note) and say which.

    ``run_images`` gives the run's own images to check on (None: generated ones are used). An ONNX
    model keeps the precision it was exported in. Auto's bf16 past the limits restores the fp32
    weights and prints one line.
    """
    if not isinstance(model, torch.nn.Module):
        return Precision("fp32", "an ONNX export runs in the precision it was exported in")
    first = next(model.parameters(), None)
    chosen = choose_precision(requested, first.device if first is not None else torch.device("cpu"))
    if chosen.name == "fp32" or first is None:
        return chosen
    if requested == "bf16":
        cast_to_bf16(model)
        return chosen
    images, source = run_images(), "validation"
    if images is None:
        images, source = generated_images(), "generated"
    check = compare_bf16(model, task, processor, info, images, source)
    if within_limits(check):
        return Precision("bf16", chosen.why, check)
    fallback = Precision("fp32", f"auto: bf16 is past the limits against fp32 (top-1 agreement at least "
                                 f"{MIN_TOP1_AGREEMENT:.1%}, max |diff| at most {MAX_ABS_DIFF:g})", check)
    print(f"note: {name} runs in fp32: {fallback.line()}", file=sys.stderr, flush=True)
    return fallback


def compare_bf16(model: torch.nn.Module, task: Task, processor: Any, info: ModelInfo, images: list[Image.Image],
                 source: str) -> dict[str, Any]:
    """Cast ``model`` to bf16 and compare its outputs on ``images`` with its fp32 ones; a model past the
    limits gets its fp32 weights back."""
    reference = raw_outputs(task, processor, info, model, images)
    originals = {name: tensor.detach().clone() for name, tensor in model.state_dict(keep_vars=True).items()}
    cast_to_bf16(model)
    trial = raw_outputs(task, processor, info, model, images)
    agreement = float((task.steps.top1(reference[0]) == task.steps.top1(trial[0])).float().mean())
    difference = max_difference(reference, trial)
    check = {"images": len(images), "source": source, "top1_agreement": agreement, "max_abs_diff": difference,
             "min_top1_agreement": MIN_TOP1_AGREEMENT, "max_abs_diff_limit": MAX_ABS_DIFF}
    if not within_limits(check):
        back_to_fp32(model, originals)
    return check


def within_limits(check: dict[str, Any]) -> bool:
    """Whether bf16's outputs in ``check`` are close enough to fp32's to serve in bf16."""
    return check["top1_agreement"] >= MIN_TOP1_AGREEMENT and check["max_abs_diff"] <= MAX_ABS_DIFF


def cast_to_bf16(model: torch.nn.Module) -> None:
    """Cast ``model``'s floating weights to bf16 (again after adapters were added), its float inputs cast
    to bf16 and its float outputs back to fp32 at its edges."""
    model.to(torch.bfloat16)
    if getattr(model, _EDGES, None) is None:
        setattr(model, _EDGES, (model.register_forward_pre_hook(_inputs_to_bf16, with_kwargs=True),
                                model.register_forward_hook(_outputs_to_fp32)))


def back_to_fp32(model: torch.nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Undo :func:`cast_to_bf16`: the ``originals`` (``state_dict``) put back and the edge hooks removed."""
    for handle in getattr(model, _EDGES, None) or ():
        handle.remove()
    setattr(model, _EDGES, None)
    model.to(torch.float32)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.copy_(originals[name])


def _inputs_to_bf16(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _map_floats(args, torch.bfloat16), _map_floats(kwargs, torch.bfloat16)


def _outputs_to_fp32(module: torch.nn.Module, args: tuple, output: Any) -> Any:
    return _map_floats(output, torch.float32)


def _map_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with its floating tensors (in dicts, model outputs, lists and tuples) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):  # model outputs are ordered dicts: changed in place, keeping their type
        for key in list(value):
            value[key] = _map_floats(value[key], dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_map_floats(item, dtype) for item in value)
    return value


def check_images(task: Task, summary_file: Any, limit: int = CHECK_IMAGES) -> list[Image.Image] | None:
    """Up to ``limit`` readable images of a run's validation data (from its summary); None where it has none."""
    try:
        records = task.data.read_validation(read_json(summary_file)).records
    except (KeyError, OSError, ValueError, VisionLoraError):  # an export, or a run made without data
        return None
    images = []
    for record in records:
        try:
            images.append(load_rgb(image_source(record)))
        except UnreadableImage:
            continue
        if len(images) == limit:
            break
    return images or None


def generated_images(count: int = CHECK_IMAGES) -> list[Image.Image]:
    """``count`` images of generated shapes (the same each time)."""
    from visionlora.examples.procedural import pretraining_classes, shape_image

    rng, classes = np.random.default_rng(0), pretraining_classes()
    return [shape_image(classes[index % len(classes)], rng, size=64) for index in range(count)]


def model_inputs(task: Task, processor: Any, info: ModelInfo, images: list) -> dict[str, torch.Tensor]:
    """The task's model inputs for ``images``, as predict makes them (one per image)."""
    options = task.prediction.default_options()
    inputs = [item for index, image in enumerate(images)
              for item in task.prediction.predict_inputs(image, index, processor, info, options)]
    return task.prediction.model_inputs([item.pixel_values for item in inputs])


@torch.inference_mode()
def raw_outputs(task: Task, processor: Any, info: ModelInfo, model: Any, images: list) -> list[torch.Tensor]:
    """The model's raw outputs (the task's ``output_names``) for ``images``, in fp32 on the CPU."""
    device = getattr(model, "device", torch.device("cpu"))
    inputs = {key: value.to(device) for key, value in model_inputs(task, processor, info, images).items()}
    outputs = model(**inputs, **info.forward_kwargs)
    return [torch.as_tensor(getattr(outputs, name)).float().cpu() for name in task.output_names]


def max_difference(a: list, b: list) -> float:
    return max(float((x - torch.as_tensor(y).float()).abs().max()) for x, y in zip(a, b))
