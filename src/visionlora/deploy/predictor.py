"""Load a finished run (base + adapter, or full model) and predict or evaluate with it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from PIL import Image

from visionlora.artifacts import INFO_FILE, RunPaths, find_run, read_json
from visionlora.data.images import UnreadableImage, is_image_file, load_rgb
from visionlora.deploy.outputs import per_image_values
from visionlora.errors import VisionLoraError
from visionlora.modeling.builtin import is_builtin
from visionlora.modeling.loading import check_base_unchanged, check_weight_files, current_policy, loading_policy
from visionlora.tasks import get_task
from visionlora.tasks.base import ModelInfo, Task


@dataclass
class LoadedRun:
    """A trained model ready for use: ``predict(images)`` and ``evaluate(data)``."""

    paths: RunPaths
    task: Task
    model: torch.nn.Module
    processor: Any
    info: ModelInfo

    def predict(self, images: Sequence[str | Path | Image.Image], **options: Any) -> list[dict[str, Any]]:
        """Predictions for image paths or PIL images, in order; unreadable files are an error.

        ``options`` are the task's predict options, e.g. ``threshold=0.5`` for detection.
        """
        opened = [_open(image) for image in images]
        return self.task.predict(self.model, self.processor, opened, self.info, **options)

    def predict_files(
        self, files: Sequence[Path], outputs: Mapping[str, Path] | None = None, box_finder=None, **options: Any
    ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """Predict image files, skipping (and listing) the unreadable ones.

        ``outputs`` maps the names of the task's writers (``output``, ``save_images``, ...)
        to where each writes; per-image options may map file names to values. A pose run
        given a ``box_finder`` (see :mod:`visionlora.tasks.pose.topdown`) predicts in the boxes it finds.
        """
        opened, names, skipped = [], [], []
        for path in files:
            try:
                opened.append(load_rgb(path))
                names.append(str(path))
            except UnreadableImage as err:
                skipped.append({"file": str(path), "reason": str(err)})
        for option in self.task.predict_options:
            if option.per_image and isinstance(options.get(option.name), Mapping):
                options[option.name] = per_image_values(options[option.name], names)
        if box_finder is not None:
            options["boxes"] = box_finder.boxes(opened)
        predictions = self.task.predict(self.model, self.processor, opened, self.info, **options)
        named = [{"image": name, **p} for name, p in zip(names, predictions)]
        for writer in self.task.writers:
            target = (outputs or {}).get(writer.name)
            if target is not None:
                writer.write(Path(target), named, opened, self.draw)
        return named, skipped

    def draw(self, image: Image.Image, prediction: dict) -> Image.Image:
        """A copy of ``image`` with ``prediction`` drawn on it."""
        return self.task.draw(image, prediction, self.info)

    def evaluate(self, data: str | None = None, batch_size: int = 16, split: str = "val") -> dict[str, Any]:
        """Metrics on ``data`` (default: the run's own validation split, or ``split="test"``, read alone)."""
        from visionlora.training.runtime import new_accelerator

        if data is None:
            if self.paths.mode == "export":
                raise VisionLoraError(f"{self.paths.root}: an export has no validation split of its own; pass --data")
            part = self.task.read_validation(read_json(self.paths.summary), split)
        else:
            part = self.task.read_evaluation(data, self.info)
        dataset, skipped = self.task.eval_dataset(part.records, self.processor, self.info)
        if len(dataset) == 0:
            raise VisionLoraError(f"{data or self.paths.root}: no readable labelled images to evaluate on")
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=self.task.collate)
        accelerator = new_accelerator(cpu=self.model.device.type == "cpu")
        metrics = self.task.evaluate(self.model, self.processor, accelerator.prepare(loader), accelerator, self.info)
        return {"metrics": metrics, "images": len(dataset), "skipped": part.skipped + skipped}


def load_run(
    run_dir: str | Path, device: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
    allow_base_change: bool = False,
) -> LoadedRun:
    """Rebuild the trained model of ``run_dir`` for inference (safetensors only unless allowed).

    A LoRA run's base is loaded at the revision recorded at training; a local base whose
    content changed since is refused unless ``allow_base_change``.
    """
    paths = find_run(run_dir)
    if not paths.completed() or (paths.mode != "export" and not read_json(paths.summary).get("completed")):
        raise VisionLoraError(f"{paths.root}: the run did not complete (no finished training summary)")
    info = ModelInfo.from_dict(read_json(paths.model_dir / INFO_FILE))
    task = get_task(info.task)
    with loading_policy(allow_pickle, trust_remote_code):
        model = _load_model(paths, task, info, allow_base_change)
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(paths.model_dir, backend="pil",
                                                       trust_remote_code=trust_remote_code)
    if isinstance(model, torch.nn.Module):
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return LoadedRun(paths, task, model, processor, info)


def _load_model(paths: RunPaths, task: Task, info: ModelInfo, allow_base_change: bool = False) -> torch.nn.Module:
    """The full model, or the base with the adapter; a mismatch or damaged file is one clear line."""
    if paths.mode == "export" and read_json(paths.export_file).get("format") == "onnx":
        from visionlora.deploy.onnx_model import OnnxModel

        return OnnxModel.load(paths.model_dir, read_json(paths.export_file))
    check_weight_files(paths.model_dir)
    if info.mode != "lora":
        return guarded_load(lambda: task.load_model(str(paths.model_dir), info), paths.model_dir, "the saved model")
    from peft import PeftModel

    base_ref = str(paths.base_dir) if is_builtin(info.base_model) else info.base_model
    pinned = check_base_unchanged(base_ref, info.base_revision, allow_base_change)
    with loading_policy(current_policy().allow_pickle, current_policy().trust_remote_code, pinned):
        base = task.load_model(base_ref, info)
    return guarded_load(lambda: PeftModel.from_pretrained(base, paths.model_dir), paths.model_dir,
                        f"base model {base_ref}")


def guarded_load(load, folder: Path, what: str):
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


def image_files(items: Iterable[str]) -> Iterator[Path]:
    """Expand the files and folders given on the command line (folders recursively, sorted)."""
    for item in items:
        path = Path(item)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
        elif path.exists():
            yield path
        else:
            raise VisionLoraError(f"{path}: no such file or folder")


def _open(image: str | Path | Image.Image) -> Image.Image:
    try:
        return load_rgb(image)
    except UnreadableImage as err:
        raise VisionLoraError(f"{image}: {err}") from None
