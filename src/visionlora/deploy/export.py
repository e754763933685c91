"""``visionlora export``: a merged transformers checkpoint, or an ONNX model checked in onnxruntime.

    merged   the adapter merged into its base (peft's merge_and_unload): a plain transformers
             folder that ``AutoModelFor<Task>.from_pretrained`` loads without peft
    onnx     the merged model through ``torch.onnx.export``, with a dynamic batch axis (and
             height and width for models that take padded images); verified against torch.
             With ``quantize="int8"``: onnxruntime's dynamic quantization of the MatMul and Gemm
             weights (activations quantized per batch at run time, so no calibration set), then
             evaluated on the run's validation split beside the fp32 model; a main metric that
             falls by more than ``max_metric_drop`` refuses the export

Both keep the processor and visionlora.json beside the weights, record what was done in
export.json and carry a model card (README.md); the folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from visionlora.artifacts import INFO_FILE, atomic_dir, atomic_write_bytes, atomic_write_json, read_json
from visionlora.deploy import MAX_METRIC_DROP, precision
from visionlora.deploy.precision import max_difference
from visionlora.deploy.prediction import predict
from visionlora.deploy.predictor import LoadedRun, load_run
from visionlora.errors import VisionLoraError
from visionlora.reporting.model_card import model_card
from visionlora.reporting.run_summary import RunSummary

FORMATS = ("merged", "onnx")
QUANTIZATIONS = ("int8",)
OPSET = 17
TOLERANCE = 1e-3  # largest difference allowed between onnxruntime and torch outputs (fp32)
MERGE_TOLERANCE = 1e-4  # between the merged model and the adapter
CHECK_IMAGES = 8
TIMING_IMAGES = 4  # images timed on each engine the export can run with


def export_run(run_dir: str | Path, output: str | Path, fmt: str = "merged", overwrite: bool = False,
               strict: bool = True, quantize: str | None = None,
               max_metric_drop: float = MAX_METRIC_DROP, timing: bool = False) -> dict[str, Any]:
    """Export the finished run in ``run_dir`` to ``output``; returns what export.json records.

    ``strict=False`` records a failed ONNX check (or int8 metric drop) instead of refusing (for
    timing untrained models). ``timing``: also time each engine the export can run with on this
    machine (:func:`time_engines`), recorded as ``engines`` in the answer (not in export.json).
    """
    if fmt not in FORMATS:
        raise VisionLoraError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise VisionLoraError(f"--quantize {quantize!r}: choose {', '.join(QUANTIZATIONS)}")
    if quantize is not None and fmt != "onnx":
        raise VisionLoraError(f"--quantize {quantize} quantizes an ONNX model: add --format onnx")
    if max_metric_drop < 0:
        raise VisionLoraError(f"--max-metric-drop must be 0 or more, got {max_metric_drop}")
    output = Path(output)
    check_output_free(output, overwrite)
    run = load_run(run_dir, device="cpu")
    if run.paths.mode == "export":
        raise VisionLoraError(f"{run.paths.root}: already an export; export the run it came from")
    images = check_images(run)
    reference = raw_outputs(run, run.model, images)
    merged = run.model.merge_and_unload() if run.info.mode == "lora" else run.model
    merged.eval()
    merge_diff = max_difference(reference, raw_outputs(run, merged, images))
    if merge_diff > MERGE_TOLERANCE:
        raise VisionLoraError(f"{run.paths.root}: the merged model differs from the adapter by {merge_diff:.2e}")
    record = {"format": fmt, "source_run": str(run.paths.root.resolve()), "task": run.info.task,
              "source_mode": run.info.mode, "checked_images": len(images), "merged_max_abs_diff": merge_diff}
    info = run.info.to_dict()
    info["mode"] = "merged" if run.info.mode == "lora" else "full"
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(output) as tmp:
        run.processor.save_pretrained(tmp)
        atomic_write_json(tmp / INFO_FILE, info)
        if fmt == "merged":
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            record.update(_export_onnx(run, merged, images, tmp, strict))
            if quantize:
                record["quantization"] = _quantize_int8(run, images, tmp, record, max_metric_drop, strict)
        atomic_write_json(tmp / "export.json", record)
        summary = RunSummary.from_dict(read_json(run.paths.summary))
        card = model_card(run.task, run.info, summary, export=fmt, folder=str(output))
        atomic_write_bytes(tmp / "README.md", card.encode())
    if timing:
        record["engines"] = time_engines(run, merged, output, record, images[:TIMING_IMAGES])
    return record


def time_engines(run: LoadedRun, merged, folder: Path, export: dict[str, Any], images: list) -> dict[str, Any]:
    """Images/s of each engine this machine can run the export with, on ``images`` in one batch: PyTorch fp32,
    the ONNX model written (fp32 or int8), and PyTorch with bf16 weights where the CPU runs bf16 natively
    (``merged`` is cast to bf16 last). ``fastest`` names the quickest; ``skipped`` says what was left out."""
    engines: dict[str, Any] = {"PyTorch fp32": merged}
    if export["format"] == "onnx":
        from visionlora.deploy.onnx_model import OnnxModel

        engines["ONNX int8" if "quantization" in export else "ONNX fp32"] = OnnxModel.load(folder, export)
    native = precision.choose_precision("auto", torch.device("cpu"))
    speeds = {name: _images_per_second(run, model, images) for name, model in engines.items()}
    if native.name == "bf16":
        precision.cast_to_bf16(merged)
        speeds["PyTorch bf16"] = _images_per_second(run, merged, images)
    timing = {"images": len(images), "images_per_second": speeds, "fastest": max(speeds, key=lambda k: speeds[k])}
    if native.name != "bf16":
        timing["skipped"] = f"PyTorch bf16 ({native.why.removeprefix('auto: ')})"
    return timing


def _images_per_second(run: LoadedRun, model, images: list) -> float:
    """Images/s of ``model``'s forward on ``images`` as one batch: the better of two runs after a warm-up."""
    raw_outputs(run, model, images)
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        raw_outputs(run, model, images)
        seconds.append(time.perf_counter() - started)
    return len(images) / min(seconds)


def check_output_free(output: Path, overwrite: bool) -> None:
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise VisionLoraError(f"{output}: output folder exists and is not empty; pass --overwrite to replace it")


def check_images(run: LoadedRun) -> list:
    """Up to CHECK_IMAGES readable images of the run's validation data."""
    images = precision.check_images(run.task, run.paths.summary, CHECK_IMAGES)
    if not images:
        raise VisionLoraError(f"{run.paths.root}: no readable validation image to check the export on")
    return images


def model_inputs(run: LoadedRun, images: list) -> dict[str, torch.Tensor]:
    """The task's model inputs for ``images``, as predict makes them (one per image)."""
    return precision.model_inputs(run.task, run.processor, run.info, images)


def raw_outputs(run: LoadedRun, model, images: list) -> list[torch.Tensor]:
    return precision.raw_outputs(run.task, run.processor, run.info, model, images)


class PlainOutputs(torch.nn.Module):
    """The model with positional tensor inputs and a tuple of the task's outputs, for the exporter."""

    def __init__(self, model, input_names, output_names, forward_kwargs):
        super().__init__()
        self.model, self.input_names, self.output_names = model, input_names, output_names
        self.forward_kwargs = forward_kwargs

    def forward(self, *inputs):
        outputs = self.model(**dict(zip(self.input_names, inputs)), **self.forward_kwargs)
        return tuple(getattr(outputs, name) for name in self.output_names)


def onnx_axes(task) -> dict[str, dict[int, str]]:
    """The dynamic axes of the task's inputs and outputs: the batch, and height and width of padded inputs."""
    axes = {name: {0: "batch"} for name in task.input_names + task.output_names}
    if task.dynamic_image_size:
        axes["pixel_values"] = {0: "batch", 2: "height", 3: "width"}
        if "pixel_mask" in axes:
            axes["pixel_mask"] = {0: "batch", 1: "height", 2: "width"}
    return axes


def write_onnx(run: LoadedRun, model, images: list, path: Path,
               fold_constants: bool = True) -> dict[str, dict[int, str]]:
    """Write ``model`` to ``path`` with ``torch.onnx.export`` (TorchScript, opset ``OPSET``), traced on
    the first two of ``images``, its task's inputs and outputs named; returns the dynamic axes."""
    task = run.task
    inputs = model_inputs(run, images[:2])
    axes = onnx_axes(task)
    wrapper = PlainOutputs(model, task.input_names, task.output_names, run.info.forward_kwargs).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(inputs[name] for name in task.input_names), str(path),
                          input_names=list(task.input_names), output_names=list(task.output_names),
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=fold_constants)
    return axes


def _export_onnx(run: LoadedRun, merged, images: list, folder: Path, strict: bool) -> dict[str, Any]:
    """Write model.onnx, then check onnxruntime against torch on ``images``."""
    from visionlora.deploy.onnx_model import OnnxModel

    task = run.task
    path = folder / "model.onnx"
    try:
        axes = write_onnx(run, merged, images, path)
    except Exception as err:  # the exporter raises many types; name the model and the operator it stopped at
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise VisionLoraError(f"{type(merged).__name__}: the ONNX exporter cannot handle this model: {first}") from None
    export = {"file": path.name, "inputs": list(task.input_names), "outputs": list(task.output_names),
              "exporter": f"torch.onnx.export (TorchScript), torch {torch.__version__}", "opset": OPSET,
              "dynamic_axes": axes}
    onnx_model = OnnxModel.load(folder, export)
    export["inputs"] = onnx_model.input_names
    difference = max_difference(raw_outputs(run, merged, images), raw_outputs(run, onnx_model, images))
    export["onnx_max_abs_diff"] = difference
    agree = _same_predictions(predict(task, merged, run.processor, images, run.info),
                              predict(task, onnx_model, run.processor, images, run.info))
    export["predictions_agree"] = agree
    exact = task.prediction.exact_outputs(merged)
    export["verified"] = agree and (difference <= TOLERANCE or not exact)
    if strict and not export["verified"]:
        raise VisionLoraError(
            f"{run.paths.root}: onnxruntime differs from torch by {difference:.2e} on the validation images "
            f"(limit {TOLERANCE:g}){'' if agree else ', and the decoded predictions differ'}"
        )
    return export


def _same_predictions(a: Any, b: Any, tolerance: float = 1e-3) -> bool:
    """Whether two JSON-ready predictions agree: same labels and structure, numbers within ``tolerance``
    (box and keypoint coordinates within 0.05 pixels)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_predictions(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list):
        return (isinstance(b, list) and len(a) == len(b)
                and all(_same_predictions(x, y, tolerance) for x, y in zip(a, b)))
    if isinstance(a, float):
        return isinstance(b, (int, float)) and abs(a - b) <= max(tolerance, 0.05 if abs(a) > 1 else 0.0)
    return a == b


def _quantize_int8(run: LoadedRun, images: list, folder: Path, export: dict[str, Any], max_drop: float,
                   strict: bool) -> dict[str, Any]:
    """Replace model.onnx by its int8 quantization, measured against the fp32 model on the run's
    validation split; refused (nothing written) when the main metric falls by more than ``max_drop``."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from visionlora.deploy.onnx_model import OnnxModel

    fp32_file, int8_file = folder / export["file"], folder / "model.int8.onnx"
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # its advice to pre-process is printed on the root logger
    try:
        quantize_dynamic(str(fp32_file), str(int8_file), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root_logger.setLevel(level)
    fp32 = OnnxModel.load(folder, export)
    int8 = OnnxModel.load(folder, {**export, "file": int8_file.name})
    task, metric = run.task, run.task.main_metric
    figures = {name: _validation_metrics(run, model)[metric] for name, model in (("fp32", fp32), ("int8", int8))}
    reference, quantized = raw_outputs(run, fp32, images), raw_outputs(run, int8, images)
    drop = figures["fp32"] - figures["int8"] if task.greater_is_better else figures["int8"] - figures["fp32"]
    record = {"method": "onnxruntime dynamic quantization: int8 MatMul/Gemm weights, activations per batch",
              "main_metric": metric, "fp32": figures["fp32"], "int8": figures["int8"], "metric_drop": drop,
              "max_metric_drop": max_drop, "max_abs_diff": max_difference(reference, quantized),
              "top1_agreement": float(torch.cat([(task.steps.top1(a) == task.steps.top1(b)).flatten().float()
                                                 for a, b in zip(reference[:1], quantized[:1])]).mean()),
              "fp32_bytes": fp32_file.stat().st_size, "int8_bytes": int8_file.stat().st_size}
    if strict and drop > max_drop:
        raise VisionLoraError(
            f"{run.paths.root}: int8 {metric} {figures['int8']:.4f} against fp32 {figures['fp32']:.4f} on the "
            f"validation split falls by {drop:.4f}, more than --max-metric-drop {max_drop:g}; export fp32 or "
            "raise the limit")
    int8_file.replace(fp32_file)
    return record


def _validation_metrics(run: LoadedRun, model) -> dict[str, Any]:
    """``model``'s metrics on the run's validation split, as ``visionlora evaluate RUN`` computes them."""
    return LoadedRun(run.paths, run.task, model, run.processor, run.info).evaluate()["metrics"]
