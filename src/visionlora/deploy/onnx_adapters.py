"""Many LoRA adapters over one ONNX base, with onnxruntime's multi-LoRA support.

``visionlora export RUN... --format onnx-adapters --output DIR`` writes::

    DIR/bases/<n>/model.onnx    a base: its LoRA A/B weights and trained head weights are graph
                                inputs whose defaults are its first run's
    DIR/<run>/                  per run: adapter.onnx_adapter (its A, B and head weights, a few
                                MB), export.json naming its base, visionlora.json, the processor

A session holds a base once; each forward picks a run's weights with
``RunOptions.add_active_adapter``. LoRA's alpha/r scale is folded into B (the base multiplies
by 1), so runs of one rank share a base whatever their alpha. Runs share a base when their
base weights, adapted modules, ranks, head sizes and processors are equal; others get a base
of their own. A run that is not a LoRA adapter (full fine-tuning, DoRA, LoHa, LoKr, OFT) is
exported as a merged ONNX model instead, said in one line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from visionlora.artifacts import INFO_FILE, atomic_dir, atomic_write_json, read_json
from visionlora.deploy.onnx_model import load_adapter_run
from visionlora.deploy.predictor import LoadedRun, load_run
from visionlora.errors import VisionLoraError
from visionlora.modeling.adapters import adapter_method, is_plain_lora, peft_type

ADAPTER_FILE = "adapter.onnx_adapter"  # a run's weights, as onnxruntime's AdapterFormat writes them
TOLERANCE = 1e-4  # largest difference between a run's logits through its ONNX adapter and through peft
ADAPTED = re.compile(r"\.(lora_A|lora_B|modules_to_save)\.")  # the weights an adapter file carries
GRAPH_PREFIX = "model."  # the export wrapper holds the model as ``model``


@dataclass
class AdapterRun:
    """A run on its way into an adapter export: its loaded model, the label it is written under,
    and its adapter weights as the ONNX graph names them (B scaled by alpha/r)."""

    label: str
    run: LoadedRun
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def group_key(self) -> tuple:
        info = self.run.info
        shapes = tuple(sorted((name, array.shape) for name, array in self.weights.items()))
        processor = (self.run.paths.model_dir / "preprocessor_config.json").read_text()
        base = info.base_revision or self.run.paths.base_dir
        return info.task, str(base), shapes, processor, json.dumps(info.forward_kwargs, sort_keys=True)


def export_adapters(run_dirs: list[str | Path], output: str | Path, overwrite: bool = False,
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the adapter export of ``run_dirs`` to ``output`` (see the module); returns the record of each part."""
    from visionlora.deploy.export import check_output_free, export_run

    output = Path(output)
    check_output_free(output, overwrite)
    adapters, fallbacks = [], []
    for label, run_dir in _labels(run_dirs).items():
        run = load_run(run_dir, device="cpu")
        refusal = _onnx_adapter_refusal(run)
        if refusal:
            fallbacks.append((label, run_dir))
            say(f"{label}: {refusal}; exported as a merged ONNX model instead ({label}/model.onnx)")
        else:
            adapters.append(AdapterRun(label, run, _adapter_weights(run.model)))
    groups: dict[tuple, list[AdapterRun]] = {}
    for item in adapters:
        groups.setdefault(item.group_key(), []).append(item)
    record: dict[str, Any] = {"bases": [], "runs": {}}
    with atomic_dir(output) as tmp:
        for number, members in enumerate(groups.values()):
            base = f"bases/{number}"
            record["bases"].append(_write_base(members, tmp / base))
            for item in members:
                record["runs"][item.label] = _write_run(item, tmp / item.label, f"../{base}")
            if len(groups) > 1:
                say(f"base {number}: {', '.join(item.label for item in members)}")
        for label, run_dir in fallbacks:
            record["runs"][label] = export_run(run_dir, tmp / label, "onnx")
        atomic_write_json(tmp / "export.json", {"format": "onnx-adapters", **record})
    return record


def _labels(run_dirs: list[str | Path]) -> dict[str, str]:
    """Each run's folder name in the export: the fewest trailing parts of its path that tell the runs apart."""
    from visionlora.deploy.runs import run_labels

    labelled = run_labels([Path(run_dir).resolve() for run_dir in run_dirs])
    return {label.replace("/", "-"): run_dir for label, run_dir in labelled.items()}


def _onnx_adapter_refusal(run: LoadedRun) -> str | None:
    """Why onnxruntime's LoRA adapters cannot carry this run (None: they can)."""
    if run.info.mode != "lora":
        return "a fully fine-tuned model has no adapter"
    config = read_json(run.paths.model_dir / "adapter_config.json")
    if is_plain_lora(config):
        return None
    if adapter_method(config) == "dora":
        return "DoRA rescales the adapted weights, which onnxruntime's adapters cannot"
    return f"onnxruntime's adapters are LoRA's A and B weights, not {peft_type(config)}"


def _adapter_weights(model) -> dict[str, np.ndarray]:
    """The run's LoRA A, B (times alpha/r) and head weights, by their names in the exported graph."""
    from peft.tuners.lora import LoraLayer

    scaling = {name: module.scaling["default"] for name, module in model.named_modules()
               if isinstance(module, LoraLayer)}
    weights = {}
    for name, tensor in model.state_dict().items():
        if not ADAPTED.search(name) or ".default." not in name:
            continue
        array = tensor.detach().float().numpy().copy()
        if ".lora_B." in name:
            array *= scaling[name.split(".lora_B.")[0]]
        weights[GRAPH_PREFIX + name] = array
    return weights


def _write_base(members: list[AdapterRun], folder: Path) -> dict[str, Any]:
    """The group's base: the first run's model exported with alpha/r set to 1, its adapted weights graph inputs."""
    import onnx
    from peft.tuners.lora import LoraLayer

    from visionlora.deploy.export import check_images, write_onnx

    first = members[0]
    model, task = load_run(first.run.paths.root, device="cpu").model, first.run.task  # a copy to rescale
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.scaling["default"] = 1.0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if GRAPH_PREFIX + name in first.weights:
                parameter.copy_(torch.from_numpy(first.weights[GRAPH_PREFIX + name]))
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    # unfolded, so that each adapted weight stays an initializer of its own, overridable below
    write_onnx(first.run, model, check_images(first.run), path, fold_constants=False)
    graph = onnx.load(str(path))
    initializers = {item.name: item for item in graph.graph.initializer}
    for item in members:  # weights inference never reads (e.g. RT-DETR's denoising embedding) are not in the graph
        item.weights = {name: array for name, array in item.weights.items() if name in initializers}
    for name in sorted(first.weights):  # overridable: an initializer that is also a graph input
        graph.graph.input.append(onnx.helper.make_tensor_value_info(
            name, initializers[name].data_type, list(initializers[name].dims)))
    onnx.save(graph, str(path))
    export = {"file": path.name, "inputs": list(task.input_names), "outputs": list(task.output_names),
              "adapter_inputs": sorted(first.weights), "runs": [item.label for item in members]}
    atomic_write_json(folder / "export.json", export)
    return {"folder": str(folder.name), "runs": export["runs"], "bytes": path.stat().st_size}


def _write_run(item: AdapterRun, folder: Path, base: str) -> dict[str, Any]:
    """The run's adapter file and description; its answers through the base checked against peft's."""
    import onnxruntime

    from visionlora.deploy.export import check_images, max_difference, raw_outputs

    folder.mkdir(parents=True)
    adapter = onnxruntime.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: onnxruntime.OrtValue.ortvalue_from_numpy(array)
                            for name, array in item.weights.items()})
    adapter.export_adapter(str(folder / ADAPTER_FILE))
    run = item.run
    run.processor.save_pretrained(folder)
    info = run.info.to_dict()
    atomic_write_json(folder / INFO_FILE, info)
    export = {"format": "onnx-adapter", "base": base, "adapter": ADAPTER_FILE, "source_run": str(run.paths.root),
              "task": run.info.task, "adapter_bytes": (folder / ADAPTER_FILE).stat().st_size}
    onnx_model = load_adapter_run(folder, export, item.label)
    images = check_images(run)
    difference = max_difference(raw_outputs(run, run.model, images), raw_outputs(run, onnx_model, images))
    export["onnx_max_abs_diff"] = difference
    if difference > TOLERANCE and run.task.prediction.exact_outputs(run.model):
        raise VisionLoraError(f"{run.paths.root}: through its ONNX adapter it differs from peft by "
                              f"{difference:.2e} (limit {TOLERANCE:g})")
    atomic_write_json(folder / "export.json", export)
    return export
