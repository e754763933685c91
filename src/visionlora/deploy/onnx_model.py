"""Exported ONNX models run by onnxruntime, called like transformers models by the tasks: a merged
model, or an ONNX base with the LoRA adapters of several runs (see ``deploy.onnx_adapters``)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
import torch

from visionlora.errors import VisionLoraError

_Model = TypeVar("_Model", bound="OnnxModel")


class OnnxModel:
    """``model(pixel_values=..., ...)`` -> an object with the exported outputs as torch tensors,
    so that the task's own decoding (box post-processing, heatmap decoding) runs unchanged.

    The session runs on the CPU with as many intra-op threads as torch uses (``--threads``)."""

    device = torch.device("cpu")

    def __init__(self, session, input_names: list[str], output_names: list[str]):
        taken = {item.name for item in session.get_inputs()}  # the exporter drops inputs a model ignores
        self.session, self.output_names = session, output_names
        self.input_names = [name for name in input_names if name in taken]

    @classmethod
    def load(cls: type[_Model], folder: Path, export: dict[str, Any]) -> _Model:
        try:
            import onnxruntime
        except ImportError:
            raise VisionLoraError("onnxruntime is not installed: pip install onnxruntime") from None
        path = Path(folder) / export["file"]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # one thread setting (--threads) for both engines
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: an adapter base's overridable weights draw a warning each
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for missing or damaged files
            raise VisionLoraError(f"{path}: cannot load the ONNX model: {str(err).splitlines()[0][:200]}") from None
        return cls(session, export["inputs"], export["outputs"])

    def eval(self) -> OnnxModel:
        return self

    def run_options(self):
        """onnxruntime's options of each forward (None: its defaults)."""
        return None

    def __call__(self, **inputs: Any) -> SimpleNamespace:
        feeds = {name: _array(inputs[name]) for name in self.input_names}
        outputs = self.session.run(self.output_names, feeds, self.run_options())
        return SimpleNamespace(**{name: torch.from_numpy(np.asarray(value))
                                  for name, value in zip(self.output_names, outputs)})


class OnnxAdapters(OnnxModel):
    """An ONNX base and the adapters loaded onto it; forwards run with the active adapter's weights.

    ``set_adapter``/``active_adapter`` are peft's names, so the server switches them alike.
    """

    def __init__(self, session, input_names: list[str], output_names: list[str]):
        super().__init__(session, input_names, output_names)
        self.adapters: dict[str, Any] = {}
        self.active_adapter: str | None = None

    def add_adapter(self, name: str, file: Path) -> None:
        import onnxruntime

        adapter = onnxruntime.LoraAdapter()
        try:
            adapter.Load(str(file))
        except Exception as err:  # onnxruntime raises its own types for missing or damaged files
            raise VisionLoraError(f"{file}: cannot load the ONNX adapter: {str(err).splitlines()[0][:200]}") from None
        self.adapters[name] = adapter
        self.active_adapter = self.active_adapter or name

    def set_adapter(self, name: str) -> None:
        self.active_adapter = name

    def release(self, name: str) -> None:
        """Forget adapter ``name`` (the server unloading its run)."""
        self.adapters.pop(name, None)

    def run_options(self):
        import onnxruntime

        adapter = self.adapters.get(self.active_adapter)
        if adapter is None:  # its run was unloaded while a request for it waited
            raise VisionLoraError(f"the adapter of {self.active_adapter!r} is no longer loaded")
        options = onnxruntime.RunOptions()
        options.add_active_adapter(adapter)
        return options


def load_adapter_run(root: Path, export: dict[str, Any], name: str) -> OnnxAdapters:
    """The base of an adapter export's run, with the run's adapter loaded and active."""
    base = (root / export["base"]).resolve()
    base_export = json.loads((base / "export.json").read_text())
    model = OnnxAdapters.load(base, base_export)
    model.add_adapter(name, root / export["adapter"])
    return model


def _array(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.detach().cpu().numpy()
    return array.astype(np.float32) if array.dtype.kind == "f" else array.astype(np.int64)
