"""Exported ONNX models run by onnxruntime, called like transformers models by the tasks: a merged
model, or an ONNX base with the LoRA adapters of several runs (see ``deploy.onnx_adapters``)."""

from __future__ import annotations

import json
import sys
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

    The session runs on onnxruntime's CUDA provider where the device asked for is CUDA and
    onnxruntime has that provider (``onnxruntime-gpu``), else on the CPU with as many intra-op
    threads as torch uses (``--threads``). Either way inputs and outputs are CPU tensors."""

    device = torch.device("cpu")  # where its inputs go and its outputs come back

    def __init__(self, session, input_names: list[str], output_names: list[str]):
        taken = {item.name for item in session.get_inputs()}  # the exporter drops inputs a model ignores
        self.session, self.output_names = session, output_names
        self.input_names = [name for name in input_names if name in taken]

    @classmethod
    def load(cls: type[_Model], folder: Path, export: dict[str, Any], device: torch.device | None = None) -> _Model:
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
            session = onnxruntime.InferenceSession(str(path), options, providers=providers_for(device))
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


def load_adapter_run(root: Path, export: dict[str, Any], name: str,
                     device: torch.device | None = None) -> OnnxAdapters:
    """The base of an adapter export's run (on onnxruntime's provider for ``device``), with the run's
    adapter loaded and active."""
    base = (root / export["base"]).resolve()
    base_export = json.loads((base / "export.json").read_text())
    model = OnnxAdapters.load(base, base_export, device)
    model.add_adapter(name, root / export["adapter"])
    return model


CUDA_PROVIDER = "CUDAExecutionProvider"
ONNX_PRECISION_NOTE = ("--precision bf16 applies to torch models: an ONNX export runs in the precision it was "
                       "exported in (fp32, or int8 weights)")


def providers_for(device: torch.device | None) -> list[Any]:
    """onnxruntime's execution providers for ``device``: CUDA (that GPU) then the CPU where the device
    is CUDA and onnxruntime has the CUDA provider, else the CPU alone (with a note when CUDA was asked for)."""
    import onnxruntime

    if device is None or device.type != "cuda":
        return ["CPUExecutionProvider"]
    if CUDA_PROVIDER not in onnxruntime.get_available_providers():
        print(f"note: onnxruntime here has no {CUDA_PROVIDER} (pip install onnxruntime-gpu): the ONNX model "
              "runs on the CPU", file=sys.stderr)
        return ["CPUExecutionProvider"]
    cuda: Any = (CUDA_PROVIDER, {"device_id": device.index}) if device.index is not None else CUDA_PROVIDER
    return [cuda, "CPUExecutionProvider"]


def _array(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.detach().cpu().numpy()
    return array.astype(np.float32) if array.dtype.kind == "f" else array.astype(np.int64)
