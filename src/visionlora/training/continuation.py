"""``--init-from RUN``: start a new run from a finished run's trained weights (adapter or full)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from visionlora.errors import VisionLoraError
from visionlora.tasks.base import Task


def start_from_run(run_dir: str, task: Task, labels: list[str], mode: str):
    """(model, processor, info, origin): the finished run's model, ready to train on ``labels``.

    A LoRA run continues its own adapter (trainable again) on its own base; its labels must
    stay the same, since the adapter's head is sized for them. A full run's weights become
    the new run's starting point in either mode; when the labels differ, its head is
    re-initialised for the new ones and everything else is kept.
    """
    from visionlora.deploy.predictor import load_run

    source = load_run(run_dir, device="cpu")
    if source.paths is None or source.paths.mode == "export":
        raise VisionLoraError(f"{run_dir}: --init-from takes a run folder, not an export")
    if source.info.task != task.name:
        raise VisionLoraError(f"{run_dir}: a {source.info.task} run cannot start a {task.name} run")
    origin = {"run": str(Path(run_dir).resolve()), "mode": source.info.mode,
              "labels_changed": source.info.labels != labels}
    if source.info.mode == "lora":
        return _continue_adapter(source, labels, mode, run_dir) + (origin,)
    model, processor, info = task.model.build_model(str(source.paths.model_dir), labels, None, mode)
    info.image_size, info.forward_kwargs = source.info.image_size, source.info.forward_kwargs
    info.state = source.info.state  # what the finished run learnt of its data (its sizes, its mean keypoints)
    if origin["labels_changed"]:
        _reset_heads(model, task.model.head_modules(model))
    return model, source.processor, info, origin


def _continue_adapter(source, labels: list[str], mode: str, run_dir: str):
    if mode != "lora":
        raise VisionLoraError(f"{run_dir}: a LoRA run continues in LoRA mode; for a full run, export it merged "
                              "(visionlora export) and train with --model on the export")
    if source.info.labels != labels:
        raise VisionLoraError(
            f"{run_dir}: its adapter's head is sized for the labels {source.info.labels}, but the data has {labels}; "
            "start from its base model instead (--model), or export it merged and start from the export")
    model = source.model
    _make_adapter_trainable(model)
    info = copy.deepcopy(source.info)
    if source.paths.base_dir.exists() and not Path(info.base_model).exists():
        info.base_model = str(source.paths.base_dir.resolve())  # a built-in base, saved with that run
    return model, source.processor, info


def _make_adapter_trainable(model: torch.nn.Module) -> None:
    """Every adapter weight (whatever peft method named it: ``lora_``, ``hada_``, ``lokr_``, ``oft_``)
    and the saved heads train again, as when the adapter was made."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                getattr(module, layer_name).requires_grad_(True)
    for name, parameter in model.named_parameters():
        if "modules_to_save" in name:
            parameter.requires_grad_(True)


def _reset_heads(model: torch.nn.Module, heads: list[str]) -> None:
    """Fresh weights for the head modules (new labels), as a newly built head would have."""
    modules = dict(model.named_modules())
    for name in heads:
        for module in modules[name].modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
