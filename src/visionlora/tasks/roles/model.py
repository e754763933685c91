"""The model role: build a task's model (a built-in, a pretrained twin or a checkpoint), load a
trained one, read facts off it, name its head and set its training mode."""

from __future__ import annotations

from typing import Any

import torch

from visionlora.data.transforms import processor_output_size, processor_size, set_processor_size
from visionlora.errors import VisionLoraError
from visionlora.modeling.builtin import build_builtin, is_builtin, label_maps, pretrained_folder
from visionlora.modeling.loading import base_revision, current_policy, load_pretrained
from visionlora.tasks.records import ModelFacts, ModelInfo, TaskDeclarations

BATCHNORM_CLASSES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


class TaskModel:
    """Hooks: ``head_modules`` (required); ``checkpoint``, ``load_kwargs``, ``resize_processor``,
    ``describe_model``, ``prepare_for_training`` (defaults)."""

    def __init__(self, task: TaskDeclarations) -> None:
        self.task = task

    def build_model(self, model_ref: str, labels: list[str], image_size: int | None,
                    mode: str) -> tuple[torch.nn.Module, Any, ModelInfo]:
        """(model, processor, info): a built-in model, or a checkpoint loaded for ``labels``."""
        task = self.task
        twin = pretrained_folder(task.name, task.builtin_models, model_ref) if is_builtin(model_ref) else None
        if twin is not None:
            model, processor = load_pretrained(self.model_class(), str(twin), **self.load_kwargs(str(twin), labels))
            self._check_twin_size(model_ref, processor, image_size)
        elif is_builtin(model_ref):
            model, processor = build_builtin(task.name, task.builtin_models, model_ref, labels, image_size)
        else:
            path, check = self.checkpoint(model_ref)
            model, processor = load_pretrained(self.model_class(), path, loading_check=check,
                                               **self.load_kwargs(model_ref, labels))
            if image_size:
                self.resize_processor(processor, image_size)
        facts = self.describe_model(model, processor, labels)
        info = ModelInfo(task.name, mode, model_ref, list(labels), processor_size(processor),
                         facts.forward_kwargs, facts.state)
        if not is_builtin(model_ref):
            info.base_revision = base_revision(model_ref, current_policy().revision)
        return model, processor, info

    def _check_twin_size(self, name: str, processor: Any, image_size: int | None) -> None:
        """A pretrained twin's position embeddings fix its input size."""
        height = processor_output_size(processor)[0]
        if image_size and image_size != height:
            raise VisionLoraError(f"--image-size {image_size}: {name} was pretrained at {height} pixels; "
                                  f"leave --image-size out or use {name.removesuffix('-pretrained')}")

    def load_model(self, path: str, info: ModelInfo) -> torch.nn.Module:
        """A saved base or fully trained model, for ``info``'s labels."""
        checkpoint, check = self.checkpoint(path)
        model, _ = load_pretrained(self.model_class(), checkpoint, with_processor=False, loading_check=check,
                                   **self.load_kwargs(path, info.labels))
        return model

    def checkpoint(self, ref: str) -> tuple[str, Any]:
        """(what to load for ``ref``, a check of transformers' loading report or None) (hook)."""
        return ref, None

    def load_kwargs(self, ref: str, labels: list[str]) -> dict[str, Any]:
        """``from_pretrained`` arguments that size the head for ``labels`` (hook)."""
        return {"num_labels": len(labels), **label_maps(labels)}

    def resize_processor(self, processor: Any, image_size: int) -> None:
        """Make the processor produce ``image_size`` inputs (hook)."""
        set_processor_size(processor, image_size)

    def describe_model(self, model: torch.nn.Module, processor: Any, labels: list[str]) -> ModelFacts:
        """The forward arguments and the first state of a model prepared by ``processor`` for
        ``labels`` (hook; default: none, and the task's empty state)."""
        return ModelFacts(state=self.task.state_type())

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """Names of the freshly initialised head modules, trained and saved with an adapter (hook)."""
        raise NotImplementedError

    def prepare_for_training(self, model: torch.nn.Module, mode: str) -> None:
        """Called after ``model.train()`` each epoch: keeps BatchNorm statistics fixed in LoRA mode (hook)."""
        if mode == "lora" and self.task.freeze_batchnorm_in_lora:
            for module in model.modules():
                if isinstance(module, BATCHNORM_CLASSES):
                    module.eval()

    def model_class(self) -> Any:
        """The transformers Auto class of the task's models."""
        import transformers

        return getattr(transformers, self.task.auto_class)

    def image_features(self, outputs: Any) -> torch.Tensor:
        """One pooled feature row per model input, from a forward run with ``output_hidden_states``:
        what ``visionlora select`` spreads its picks over (hook; default: the encoder's last maps,
        else the last hidden state, averaged over positions)."""
        return pooled_features(outputs)


FEATURE_OUTPUTS = ("encoder_last_hidden_state", "hidden_states", "last_hidden_state")


def pooled_features(outputs: Any) -> torch.Tensor:
    """(N, D) from the first of ``FEATURE_OUTPUTS`` a model gives: maps (N, C, H, W) and tokens
    (N, T, D) averaged over positions, the maps of several levels concatenated; of the hidden
    states of every layer, the last."""
    for name in FEATURE_OUTPUTS:
        value = outputs.get(name) if hasattr(outputs, "get") else getattr(outputs, name, None)
        if value is None:
            continue
        if isinstance(value, (tuple, list)):
            levels = [value[-1]] if name == "hidden_states" else list(value)
            return torch.cat([_pooled(level) for level in levels], dim=1)
        return _pooled(value)
    raise VisionLoraError(f"the model gives none of {', '.join(FEATURE_OUTPUTS)} to take image features from")


def _pooled(value: torch.Tensor) -> torch.Tensor:
    value = value.float()
    return value.mean(dim=(2, 3)) if value.dim() == 4 else value.mean(dim=1) if value.dim() == 3 else value

