"""The runs a server holds: each distinct base model once, every LoRA run an adapter on it.

A LoRA run's base is keyed by its resolved location (hub id, or the folder of a built-in
model's saved base) plus the revision of its weights, its head size and the adapter's peft
type, so a changed base is never silently shared and adapters of other peft types get a
base copy of their own (peft cannot hold two types in one model). Full-mode runs are
models of their own. Forwards on one base are serialised by that base's lock, with its
adapter switched in first, so requests for different adapters never see each other's
weights.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from visionlora.artifacts import RunPaths, folder_bytes
from visionlora.deploy.runs import RunFolder, open_run
from visionlora.errors import VisionLoraError
from visionlora.modeling.loading import base_revision, check_weight_files, loading_policy
from visionlora.tasks.base import ModelInfo, Task


@dataclass
class SharedBase:
    """One model in memory (a base with adapters, or a full model) and the lock around its forwards."""

    key: tuple
    model: torch.nn.Module
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: set[str] = field(default_factory=set)


@dataclass
class ServedModel:
    """A run as the server offers it."""

    name: str
    paths: RunPaths
    task: Task
    info: ModelInfo
    processor: Any
    base: SharedBase
    adapter_bytes: int

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task.name,
            "mode": self.info.mode,
            "base_model": self.info.base_model,
            "labels": self.info.labels,
            "adapter_bytes": self.adapter_bytes,
            "shares_base_with": sorted(self.base.adapters - {self.name}),
            "options": [o.name for o in self.task.predict_options],
        }

    def predict(self, images, precision: str = "fp32", **options: Any) -> list[dict]:
        """The task's predictions with this run's weights active (thread-safe)."""
        with self.base.lock:
            if self.info.mode == "lora":
                self.base.model.set_adapter(self.name)
            with _precision(precision, self.base.model):
                return self.task.predict(self.base.model, self.processor, images, self.info, **options)


class ModelStore:
    """Named runs, loading each base once; safe to change while serving."""

    def __init__(self, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.models: dict[str, ServedModel] = {}
        self.bases: dict[tuple, SharedBase] = {}
        self._lock = threading.Lock()

    def add(self, name: str, run_dir: str | Path) -> ServedModel:
        """Load the run in ``run_dir`` as ``name`` (safetensors only, no checkpoint code)."""
        with self._lock:
            if name in self.models:
                raise VisionLoraError(f"a model named {name!r} is already served")
            run = open_run(run_dir)
            if run.is_onnx:
                raise VisionLoraError(f"{run.paths.root}: an ONNX export runs in onnxruntime (visionlora predict); "
                                      "serve takes runs and merged exports")
            with loading_policy(False, False):
                check_weight_files(run.paths.model_dir)
                base = self._attach(name, run)
                processor = run.load_processor()
            paths, task, info = run.paths, run.task, run.info
            weights = sorted(paths.model_dir.glob("*.safetensors"))
            served = ServedModel(name, paths, task, info, processor, base,
                                 weights[0].stat().st_size if weights else folder_bytes(paths.model_dir))
            self.models[name] = served
            return served

    def remove(self, name: str) -> None:
        """Unload ``name``; a base is freed when its last adapter goes."""
        with self._lock:
            served = self.models.pop(name, None)
            if served is None:
                raise KeyError(name)
            base = served.base
            with base.lock:
                if served.info.mode == "lora":
                    base.model.delete_adapter(name)
                base.adapters.discard(name)
            if not base.adapters:
                self.bases.pop(base.key, None)

    def _attach(self, name: str, run: RunFolder) -> SharedBase:
        if run.info.mode != "lora":
            model = run.load_full_model().to(self.device).eval()
            base = SharedBase(("full", str(run.paths.model_dir.resolve())), model, adapters={name})
            self.bases[base.key] = base
            return base
        from peft import PeftModel

        base_ref = run.base_ref
        if Path(base_ref).exists():
            base_ref = str(Path(base_ref).resolve())  # one key for every spelling of a local folder
        key = (run.info.task, base_ref, base_revision(base_ref), len(run.info.labels), run.adapter_type())
        shared = self.bases.get(key)
        if shared is None:
            model = run.load_base()
            peft_model = run.attach_adapter(lambda: PeftModel.from_pretrained(model, run.paths.model_dir,
                                                                              adapter_name=name))
            shared = SharedBase(key, peft_model.to(self.device).eval())
            self.bases[key] = shared
        else:
            with shared.lock:
                run.attach_adapter(lambda: shared.model.load_adapter(run.paths.model_dir, adapter_name=name))
                shared.model.to(self.device).eval()
        shared.adapters.add(name)
        return shared


class _precision:
    """fp32 by default (answers equal ``visionlora predict``); bf16 autocast when asked."""

    def __init__(self, precision: str, model: torch.nn.Module):
        device = next(model.parameters()).device.type
        self.context = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else None

    def __enter__(self):
        return self.context.__enter__() if self.context else None

    def __exit__(self, *exc):
        return self.context.__exit__(*exc) if self.context else False
