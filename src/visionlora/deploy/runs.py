"""Rebuild a finished run from its folder: the one loader behind ``predict``, ``evaluate``,
``export``, ``--init-from``, ``--detector`` and the server.

A run folder is checked once (completed, its model description, its task); a LoRA run's
base is found where training left it (a built-in base is saved with the run, any other is
loaded by its reference) at the revision recorded at training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from visionlora.artifacts import INFO_FILE, RunPaths, find_run, read_json
from visionlora.errors import VisionLoraError
from visionlora.modeling.adapters import peft_type
from visionlora.modeling.builtin import is_builtin
from visionlora.modeling.loading import (
    check_base_unchanged,
    check_weight_files,
    current_policy,
    load_pretrained,
    loading_policy,
)
from visionlora.tasks import get_task, read_model_info
from visionlora.tasks.base import ModelInfo, Task

if TYPE_CHECKING:
    from visionlora.deploy.onnx_model import OnnxModel


@dataclass
class RunFolder:
    """A finished run (or export) folder, checked: where its files are, its model description and task."""

    paths: RunPaths
    info: ModelInfo
    task: Task
    export: dict[str, Any] | None = None  # an export's export.json

    @property
    def is_onnx(self) -> bool:
        """An ONNX export, merged or an adapter over an ONNX base."""
        return self.export is not None and self.export.get("format") in ("onnx", "onnx-adapter")

    @property
    def onnx_base(self) -> Path | None:
        """The ONNX base folder of an adapter export (None for any other run)."""
        if self.export is None or self.export.get("format") != "onnx-adapter":
            return None
        return (self.paths.root / self.export["base"]).resolve()

    @property
    def base_ref(self) -> str:
        """What a LoRA run's base loads from: the built-in base saved with the run, else its reference."""
        return str(self.paths.base_dir) if is_builtin(self.info.base_model) else self.info.base_model

    def adapter_type(self) -> str:
        """peft's name of the adapter method (LORA, LOHA, ...), from the adapter's config file."""
        return peft_type(read_json(self.paths.model_dir / "adapter_config.json"))

    def load_full_model(self) -> torch.nn.Module:
        """A full run's (or merged export's) model."""
        folder = self.paths.model_dir
        return guarded_load(lambda: self.task.model.load_model(str(folder), self.info), folder, "the saved model")

    def load_base(self, allow_base_change: bool = False) -> torch.nn.Module:
        """A LoRA run's base, refused when a local base's content changed since training (unless allowed)."""
        pinned = check_base_unchanged(self.base_ref, self.info.base_revision, allow_base_change)
        with loading_policy(current_policy().allow_pickle, current_policy().trust_remote_code, pinned):
            return self.task.model.load_model(self.base_ref, self.info)

    def attach_adapter(self, load: Callable[[], Any]) -> Any:
        """Run ``load`` (a peft call loading this run's adapter), damaged or mismatched weights as one line."""
        return guarded_load(load, self.paths.model_dir, f"base model {self.base_ref}")

    def load_processor(self, trust_remote_code: bool = False):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(self.paths.model_dir, backend="pil",
                                                  trust_remote_code=trust_remote_code)


def open_run(run_dir: str | Path) -> RunFolder:
    """The checked folder of a finished run or export."""
    paths = find_run(run_dir)
    if not paths.completed() or (paths.mode != "export" and not read_json(paths.summary).get("completed")):
        raise VisionLoraError(f"{paths.root}: the run did not complete (no finished training summary)")
    info = read_model_info(read_json(paths.model_dir / INFO_FILE))
    return RunFolder(paths, info, get_task(info.task), read_json(paths.export_file) if paths.mode == "export" else None)


def load_model(run: RunFolder, allow_base_change: bool = False,
               device: torch.device | None = None) -> torch.nn.Module | OnnxModel:
    """The run's model for inference: an ONNX session (on onnxruntime's provider for ``device``), the full
    model, or the base with the adapter (on the CPU, for the caller to move)."""
    if run.export is not None and run.onnx_base is not None:
        from visionlora.deploy.onnx_model import load_adapter_run

        return load_adapter_run(run.paths.root, run.export, run.paths.root.name, device)
    if run.export is not None and run.is_onnx:
        from visionlora.deploy.onnx_model import OnnxModel

        return OnnxModel.load(run.paths.model_dir, run.export, device)
    check_weight_files(run.paths.model_dir)
    if run.info.mode != "lora":
        return run.load_full_model()
    from peft import PeftModel

    base = run.load_base(allow_base_change)
    return run.attach_adapter(lambda: PeftModel.from_pretrained(base, run.paths.model_dir))


def load_hub_model(ref: str, task: Task) -> tuple[torch.nn.Module, Any, ModelInfo]:
    """(model, processor, info) of a hub (or local) checkpoint of ``task`` used as it is, with its own labels."""
    from visionlora.data.transforms import processor_size

    checkpoint, check = task.model.checkpoint(ref)
    model, processor = load_pretrained(task.model.model_class(), checkpoint, loading_check=check)
    config = model.config
    labels = [str(config.id2label[i]) for i in range(len(config.id2label))]
    facts = task.model.describe_model(model, processor, labels)
    info = ModelInfo(task.name, "full", ref, labels, processor_size(processor), facts.forward_kwargs, facts.state)
    return model, processor, info


def guarded_load(load: Callable[[], Any], folder: Path, what: str):
    """Run ``load``; damaged or mismatched weights become one clear line naming ``folder``."""
    try:
        return load()
    except VisionLoraError:
        raise
    except Exception as err:  # safetensors, torch and peft raise many types for damaged or mismatched weights
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "size mismatch" in str(err) or "Error(s) in loading state_dict" in str(err):
            reason = "its weights do not fit " + what + " (other labels or architecture?)"
        elif "deserializ" in first.lower() or "header" in first.lower() or "incomplete" in first.lower():
            reason = "its weights file is truncated or damaged"
        else:
            reason = f"cannot load it onto {what}"
        raise VisionLoraError(f"{folder}: {reason}: {first[:200]}") from None


def run_labels(folders: list[Path]) -> dict[str, str]:
    """Each run by the fewest trailing parts of its path that tell the runs apart: ``runs/ants/lora``
    and ``runs/bees/lora`` are ``ants/lora`` and ``bees/lora``; a lone run is its folder name."""
    folders = list(dict.fromkeys(folders))
    for depth in range(1, max(len(folder.parts) for folder in folders) + 1):
        labels = ["/".join(folder.parts[-depth:]) for folder in folders]
        if len(set(labels)) == len(labels):
            return {label: str(folder) for label, folder in zip(labels, folders)}
    raise AssertionError("distinct paths always differ in some trailing parts")
