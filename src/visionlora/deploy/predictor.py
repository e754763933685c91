"""Load a finished run (base + adapter, or full model) and predict or evaluate with it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from PIL import Image

from visionlora.artifacts import RunPaths, read_json
from visionlora.core.labelling import LabelFormat, LabelSource
from visionlora.core.outputs import JSON_OUTPUT, per_image_values
from visionlora.data.images import UnreadableImage, is_image_file, load_rgb
from visionlora.deploy.evaluation import evaluate
from visionlora.deploy.precision import FP32, Precision, check_images, settle_precision
from visionlora.deploy.prediction import predict
from visionlora.deploy.runs import load_hub_model, load_model, open_run
from visionlora.errors import VisionLoraError
from visionlora.modeling.loading import loading_policy
from visionlora.runtime import pick_device
from visionlora.tasks import get_task
from visionlora.tasks.base import BoxRequest, ModelInfo, Task


@dataclass
class LoadedModel:
    """A model ready for use: ``predict(images)`` and ``evaluate(data)``; a finished run, or a hub
    model used as it is."""

    paths: RunPaths | None  # None for a hub model used as it is
    task: Task
    model: Any  # a torch model, or an ONNX model called alike (deploy.onnx_model)
    processor: Any
    info: ModelInfo
    precision: Precision = FP32  # the precision the model runs in (deploy.precision)

    def predict(self, images: Sequence[str | Path | Image.Image], **options: Any) -> list[dict[str, Any]]:
        """Predictions for image paths or PIL images, in order; unreadable files are an error.

        ``options`` are the task's predict options, e.g. ``threshold=0.5`` for detection.
        """
        opened = [_open(image) for image in images]
        return predict(self.task, self.model, self.processor, opened, self.info, **options)

    def predict_files(
        self, files: Sequence[Path], outputs: Mapping[str, Path] | None = None, box_finder: BoxFinder | None = None,
        label_format: LabelFormat | None = None, **options: Any
    ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """Predict image files, skipping (and listing) the unreadable ones.

        ``outputs`` maps the names of the task's writers (``output``, ``save_images``, ...)
        to where each writes; per-image options may map file names to values. Given a
        :class:`BoxFinder` (top-down), the run predicts in the boxes it finds. Given a
        ``label_format`` (one of the task's), ``output`` is written in it rather than as JSON.
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
        predictions = self.predictor(options, box_finder)(opened)
        named = [{"image": name, **p} for name, p in zip(names, predictions)]
        for writer in self.task.writers:
            target = (outputs or {}).get(writer.name)
            if target is not None and not (label_format is not None and writer is JSON_OUTPUT):
                writer.write(Path(target), named, opened, self.draw)
        if label_format is not None:
            if not (outputs or {}).get(JSON_OUTPUT.name):
                raise VisionLoraError(f"--format {label_format.name} needs --output {label_format.target}")
            label_format.write(Path((outputs or {})[JSON_OUTPUT.name]), named, opened, self.label_source())
        return named, skipped

    def label_source(self) -> LabelSource:
        """What pre-labels say of this model: the run (or hub model) as version, its labels and state."""
        version = str(self.paths.root) if self.paths is not None else self.info.base_model
        return LabelSource(version, list(self.info.labels), self.info.state.to_dict())

    def predictor(self, options: dict[str, Any], boxes: BoxFinder | None = None):
        """A function from opened images to their predictions with ``options`` (in ``boxes``' boxes when given)."""
        if boxes is not None:
            boxes.request.refuse_given_boxes(options)

        def predict_images(images: list[Image.Image]) -> list[dict[str, Any]]:
            found = boxes.options(images) if boxes is not None else {}
            return predict(self.task, self.model, self.processor, images, self.info, **options, **found)

        return predict_images

    def draw(self, image: Image.Image, prediction: dict) -> Image.Image:
        """A copy of ``image`` with ``prediction`` drawn on it."""
        return self.task.prediction.draw(image, prediction, self.info)

    def evaluate(self, data: str | None = None, batch_size: int = 16, split: str = "val") -> dict[str, Any]:
        """Metrics on ``data`` (default: the run's own validation split, or ``split="test"``, read alone)."""
        from visionlora.runtime import new_accelerator

        if data is None:
            if self.paths is None:
                raise VisionLoraError(f"{self.info.base_model}: a hub model has no validation split; pass --data")
            if self.paths.mode == "export":
                raise VisionLoraError(f"{self.paths.root}: an export has no validation split of its own; pass --data")
            part = self.task.data.read_validation(read_json(self.paths.summary), split)
        else:
            part = self.task.data.read_evaluation(data, self.info)
        dataset, skipped = self.task.data.eval_dataset(part.records, self.processor, self.info)
        if len(dataset) == 0:
            source = data or (self.paths.root if self.paths is not None else data)
            raise VisionLoraError(f"{source}: no readable labelled images to evaluate on")
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=self.task.steps.collate)
        accelerator = new_accelerator(cpu=self.model.device.type == "cpu", device_placement=False)
        batches = OnDevice(accelerator.prepare(loader), self.model.device)
        metrics = evaluate(self.task, self.model, self.processor, batches, accelerator, self.info)
        return {"metrics": metrics, "images": len(dataset), "skipped": part.skipped + skipped,
                "precision": self.precision.name}


class OnDevice:
    """A data loader whose batches arrive on ``device`` (the model's own, e.g. ``cuda:1``)."""

    def __init__(self, loader: Any, device: torch.device):
        self.loader, self.device, self.dataset = loader, device, loader.dataset

    def __iter__(self) -> Iterator[Any]:
        from accelerate.utils import send_to_device

        for batch in self.loader:
            yield send_to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)


@dataclass
class LoadedRun(LoadedModel):
    """A trained model of a finished run (or export) ready for use: ``predict(images)`` and ``evaluate(data)``."""

    paths: RunPaths


def load_run(
    run_dir: str | Path, device: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
    allow_base_change: bool = False, precision: str = "fp32",
) -> LoadedRun:
    """Rebuild the trained model of ``run_dir`` for inference (safetensors only unless allowed).

    ``device``: ``auto`` (or None: CUDA, then Apple MPS, then the CPU), ``cpu``, ``cuda[:N]`` or
    ``mps``; an ONNX export runs on onnxruntime's CUDA provider where that device is CUDA.
    A LoRA run's base is loaded at the revision recorded at training; a local base whose
    content changed since is refused unless ``allow_base_change``. ``precision``: fp32, bf16, or auto
    (bf16 where ``device`` runs it natively and the run's outputs in bf16 stay within the limits of
    :mod:`visionlora.deploy.precision`).
    """
    target = pick_device(device or "auto")
    run = open_run(run_dir)
    with loading_policy(allow_pickle, trust_remote_code):
        model = _to_device(load_model(run, allow_base_change, device=target), target)
        processor = run.load_processor(trust_remote_code)
    chosen = settle_precision(model, precision, run.task, processor, run.info,
                              lambda: check_images(run.task, run.paths.summary), name=str(run.paths.root))
    return LoadedRun(run.paths, run.task, model, processor, run.info, chosen)


def load_model_or_hub(ref: str, task_name: str, allow_pickle: bool = False,
                      trust_remote_code: bool = False, device: str | None = None) -> LoadedModel:
    """A run folder or export of ``task_name``, or a hub checkpoint of that task used as it is (its own labels)."""
    if Path(ref).exists():
        return load_run(ref, device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    task = get_task(task_name)
    with loading_policy(allow_pickle, trust_remote_code):
        model, processor, info = load_hub_model(ref, task)
    return LoadedModel(None, task, _to_device(model, pick_device(device or "auto")), processor, info)


@dataclass
class BoxFinder:
    """Top-down: the boxes a model of another task finds in images, as ``request`` asks and keeps them."""

    model: LoadedModel
    request: BoxRequest

    def __call__(self, images: list[Image.Image]) -> list[list[list[float]]]:
        return self.request.keep(self.model.predict(images, **self.request.model_options()))

    def options(self, images: list[Image.Image]) -> dict[str, Any]:
        """The predict options the boxes found in ``images`` give (the boxes; for pose, also their scores)."""
        return self.request.options(self.model.predict(images, **self.request.model_options()))


def box_finder(run: LoadedRun, values: dict[str, Any], **loading: Any) -> BoxFinder | None:
    """The box finder ``run``'s task asks for with its ``box_options`` ``values``; None when no box model is named."""
    request = run.task.prediction.box_request(values)
    if request is None:
        return None
    model = load_model_or_hub(request.model, request.model_task, **loading)
    request.check(model.info, request.model)
    return BoxFinder(model, request)


def _to_device(model, device: torch.device):
    if isinstance(model, torch.nn.Module):  # an ONNX session stays where onnxruntime put it
        model.to(device).eval()
    return model


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
