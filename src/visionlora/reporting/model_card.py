"""A Hugging Face model card (README.md) for a trained model folder, from the run's summary."""

from __future__ import annotations

from typing import Any

import yaml

from visionlora.modeling.builtin import is_builtin
from visionlora.reporting.run_summary import RunSummary
from visionlora.tasks.base import ModelInfo, Task


def model_card(task: Task, info: ModelInfo, summary: RunSummary, export: str | None = None,
               folder: str | None = None) -> str:
    """The card's YAML metadata and Markdown body; every figure comes from ``summary``.

    ``export`` (merged or onnx) makes it the card of an exported folder (``folder``).
    """
    adapter = summary.mode == "lora" and export is None
    metadata = {
        "base_model": summary.base_model,
        "library_name": "peft" if adapter else "onnx" if export == "onnx" else "transformers",
        "pipeline_tag": task.pipeline_tag,
        "tags": ["visionlora", task.name, summary.method if summary.mode == "lora" else "full-fine-tune"]
        + ([f"{export}-export"] if export else []),
        "model-index": [{"name": summary.run_dir.rstrip("/").rsplit("/", 1)[-1],
                         "results": _results(task, summary)}],
    }
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", ""]
    lines += _body(task, info, summary, adapter, export, folder)
    return "\n".join(lines) + "\n"


def _results(task: Task, summary: RunSummary) -> list[dict[str, Any]]:
    results = []
    for split, metrics in (("validation", summary.metrics), ("test", summary.test_metrics)):
        if not metrics:
            continue
        scalars = [{"type": name, "value": value} for name, value in metrics.items() if isinstance(value, (int, float))]
        results.append({"task": {"type": task.pipeline_tag},
                        "dataset": {"name": str(summary.data.source(split if split == "test" else "val")),
                                    "type": "custom", "split": split},
                        "metrics": scalars})
    return results


def _body(task: Task, info: ModelInfo, summary: RunSummary, lora: bool, export: str | None,
          folder: str | None) -> list[str]:
    return (_introduction(task, info, summary, lora, export) + _results_table(summary) + _training(summary)
            + _data(summary) + _use(task, info, summary, lora, export, folder) + _limits(summary))


def _introduction(task: Task, info: ModelInfo, summary: RunSummary, lora: bool, export: str | None) -> list[str]:
    headline = summary.headline
    exported = {None: ".", "merged": ", then exported with the adapter merged into the base: a plain transformers "
                "model.", "onnx": ", then exported to ONNX (adapter merged) and checked against torch in onnxruntime."}
    return [
        f"# {summary.task} {'LoRA adapter' if lora else 'model'} on {summary.base_model}"
        + (f" ({export} export)" if export else ""),
        "",
        f"This model {task.card_does} {len(info.labels)} {task.label_noun}: "
        + ", ".join(f"`{label}`" for label in info.labels) + ".",
        f"It was {'fine-tuned in full from' if summary.mode == 'full' else 'trained as an adapter on'} "
        f"`{summary.base_model}` with [visionlora](https://pypi.org/project/visionlora/) "
        f"({summary.versions['visionlora']})" + exported[export],
        "",
        f"**{summary.main_metric}: {headline.value:.4f}** on the {headline.split} split"
        + (f" (validation: {headline.validation_value:.4f})" if headline.validation_value is not None else "")
        + ".",
        "",
    ]


def _results_table(summary: RunSummary) -> list[str]:
    lines = ["## Results", "", "| metric | validation | test |", "|---|---:|---:|"]
    test = summary.test_metrics or {}
    for name, value in summary.metrics.items():
        if isinstance(value, (int, float)):
            other = test.get(name)
            lines.append(f"| {name} | {value:.4f} | {other:.4f} |" if isinstance(other, (int, float))
                         else f"| {name} | {value:.4f} | - |")
    return lines


def _training(summary: RunSummary) -> list[str]:
    training, parameters, sizes = summary.training, summary.parameters, summary.sizes
    lines = [
        "",
        "## Training",
        "",
        f"- epochs: {training.epochs_run} of {training.epochs} (best: {summary.best_epoch}), batch size "
        f"{training.settings['batch_size']}, learning rate {training.settings['lr']}, "
        f"seed {training.settings['seed']}",
        f"- precision: {summary.mixed_precision} ({summary.mixed_precision_reason})",
        f"- trainable parameters: {parameters.trainable:,} of {parameters.total:,} "
        f"({parameters.trainable_percent:.2f}%)",
    ]
    if summary.lora:
        requested, resolved = summary.lora.requested, summary.lora.resolved
        lines.append(f"- adapter ({summary.lora.method}): r {requested['r']}, alpha {requested['alpha']}, "
                     f"dropout {requested['dropout']}, "
                     f"on {', '.join(resolved['target_modules'])} ({resolved['adapted_layers']} layers); "
                     f"trained in full and saved with it: {', '.join(resolved['modules_to_save'])}")
    weights = ("no weights file" if sizes.weights_file_bytes is None
               else f"{sizes.weights_file_bytes / 1e6:.2f} MB of weights")
    lines.append(f"- size of the trained run: {weights}"
                 + (f" (the base model holds {sizes.base_model_bytes / 1e6:.1f} MB)" if summary.mode == "lora" else ""))
    return lines


def _data(summary: RunSummary) -> list[str]:
    data, counts = summary.data, summary.data.counts
    return [
        "",
        "## Data",
        "",
        f"- format {data.format}; training: {data.source('train')}; validation: {data.source('val')}"
        + (f"; test: {data.source('test')}" if data.source("test") else ""),
        "- counts: " + ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, (dict, list))),
        f"- files skipped as unreadable: {data.skipped_count}",
        *[f"- note: {note}" for note in data.notes],
    ]


def _use(task: Task, info: ModelInfo, summary: RunSummary, lora: bool, export: str | None,
         folder: str | None) -> list[str]:
    library = "onnxruntime" if export == "onnx" else "transformers" + (" and peft" if lora else "")
    return ["", "## Use", "", "With visionlora:", "", "```python", "import visionlora", "",
            f'run = visionlora.load("{folder or summary.run_dir}")', 'print(run.predict(["image.jpg"]))',
            "```", "", f"With {library}:", "", "```python",
            *_load_snippet(task, info, summary, lora, export, folder), "```"]


def _limits(summary: RunSummary) -> list[str]:
    counts = summary.data.counts
    return ["", "## Limits", "",
            f"- Trained on {counts.get('train')} images; the numbers above come from {counts.get('val')} validation"
            + (f" and {counts.get('test')} test" if counts.get("test") else "")
            + " images and carry the uncertainty of that size.",
            "- The model knows only the labels above, and images like those it was trained on."]


def _load_snippet(task: Task, info: ModelInfo, summary: RunSummary, lora: bool, export: str | None,
                  folder: str | None) -> list[str]:
    auto = task.auto_class
    folder = folder or f"{summary.run_dir}/{'trained_model_lora' if lora else 'trained_model'}"
    if export == "onnx":
        return ["import onnxruntime", "from PIL import Image", "from transformers import AutoImageProcessor", "",
                f'session = onnxruntime.InferenceSession("{folder}/model.onnx")',
                f'processor = AutoImageProcessor.from_pretrained("{folder}")',
                'pixels = processor(images=Image.open("image.jpg").convert("RGB"), '
                'return_tensors="np")["pixel_values"]',
                'outputs = session.run(None, {"pixel_values": pixels})']
    lines = [f"from transformers import AutoImageProcessor, {auto}"]
    if lora:
        lines += ["from peft import PeftModel", "",
                  f'base = {auto}.from_pretrained("{_base_location(summary)}", num_labels={len(info.labels)}, '
                  "ignore_mismatched_sizes=True)",
                  f'model = PeftModel.from_pretrained(base, "{folder}").eval()']
    else:
        lines += ["", f'model = {auto}.from_pretrained("{folder}").eval()']
    lines.append(f'processor = AutoImageProcessor.from_pretrained("{folder}")')
    return lines


def _base_location(summary: RunSummary) -> str:
    """Where plain transformers finds the base: a built-in base is saved in the run's ``base_model/``."""
    base = summary.base_model
    return f"{summary.run_dir}/base_model" if is_builtin(base) else base
