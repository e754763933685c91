"""The task base: what every task shares, with hooks for what differs.

A task turns user data into datasets, builds or loads its model, computes the loss,
evaluates, predicts and draws. The engine, the command line, inference and the server
only use this class's methods and declarations, never a concrete task.

A task subclass fills in:

- declarations: ``name``, ``preset``, ``data_formats``, ``main_metric``, ``auto_class``, ``pipeline_tag``,
  ``card_does``, ``output_names``, and when they differ from the defaults ``label_noun``,
  ``fp16_unsafe``, ``weighs_classes``, ``input_names``, ``predict_options``, ``writers``,
  ``box_options`` (with ``box_request``), ``unbounded_metrics``, ``freeze_batchnorm_in_lora``,
  ``split_group``, ``dynamic_image_size``;
- data: ``train_dataset``, ``eval_dataset`` (and ``check_data`` for the labels, ``count``,
  ``image_bytes`` for the cache estimate, ``sample_weights`` for ``--balanced-sampler``);
- model: ``head_modules`` (and ``load_kwargs``, ``checkpoint``, ``describe_model`` where needed);
- steps: ``loss``, ``eval_step``, ``metrics`` (and ``collate``, ``device_batch`` for batches whose
  compact loader types widen on the device);
- prediction: ``predict_inputs``, ``decode``, ``draw`` (and ``model_inputs`` for padded
  batches, ``combine`` for several inputs per image, ``exact_outputs`` for export checks);
- reports: ``diagnostics`` (per-class rows and plots), ``ground_truth`` and ``caption`` (for the grid).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from visionlora.data.batches import stacked
from visionlora.data.cache import CachePlan, CacheReport, plan_cache
from visionlora.data.formats import read_evaluation_part, read_part, read_source, read_validation
from visionlora.data.records import Part, SourceData
from visionlora.data.transforms import Normalizer, processor_output_size, processor_size, set_processor_size
from visionlora.deploy.outputs import DRAWN_IMAGES, JSON_OUTPUT, Option, OutputWriter
from visionlora.errors import VisionLoraError
from visionlora.lazy import import_object
from visionlora.modeling.builtin import build_builtin, is_builtin, pretrained_folder
from visionlora.modeling.loading import base_revision, current_policy, load_pretrained
from visionlora.modeling.mixed_batches import mixed_rows, select_rows


@dataclass(frozen=True)
class Preset:
    """A task's defaults: base model, LoRA shape and learning rates."""

    model: str
    lora_r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    lr_lora: float
    lr_full: float

    def settings(self, mode: str) -> dict[str, Any]:
        """The config values this preset fills in for ``mode``."""
        return {
            "model": self.model,
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "target_modules": list(self.target_modules),
            "lr": self.lr_lora if mode == "lora" else self.lr_full,
        }


@dataclass(frozen=True)
class DemoRecipe:
    """A task's part of ``visionlora demo``: generated data, the built-in base and how long to train."""

    description: str  # what the generated data is, e.g. "4 colour classes, 160 train / 48 val images"
    make_data: str  # "module:function" called as function(folder, **arguments)
    arguments: dict[str, Any]
    model: str  # a built-in model
    epochs: int
    # per mode ("lora", "full"), settings that replace the preset's, e.g. {"lora": {"lr": 3e-3}};
    # a mode without "lr" takes the demo's own (``examples.demo.DEMO_LR``)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def generate(self, folder) -> None:
        import_object(self.make_data)(folder, **self.arguments)


@dataclass
class ModelInfo:
    """What is needed to rebuild and use a trained model; saved as ``visionlora.json``."""

    task: str
    mode: str
    base_model: str
    labels: list[str]
    image_size: dict[str, int]
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    base_revision: str | None = None  # the hub commit or content hash of the base's weights
    format_version: int = 1

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["id2label"] = {str(i): name for i, name in self.id2label.items()}
        data["label2id"] = self.label2id
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Evaluation:
    """Metrics of one pass over a dataset, and the outputs (``eval_step``'s) behind them."""

    metrics: dict[str, Any]
    indices: list[int]  # dataset indices, in order
    outputs: list[Any]


@dataclass
class Diagnostics:
    """What the best epoch's validation outputs show: rows for ``per_class.csv`` and plots
    (file name -> PNG bytes)."""

    per_class: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Datasets:
    """The training and validation datasets of a run, and what reading them skipped."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    counts: dict[str, Any]
    skipped: list[dict[str, str]]
    description: dict[str, Any]
    cache: CacheReport | None = None
    test: torch.utils.data.Dataset | None = None  # held out, evaluated once at the end


class SeededDataset(torch.utils.data.Dataset):
    """A dataset whose random augmentation of item ``i`` in epoch ``e`` depends only on
    (seed, e, i): runs repeat whatever the number of workers, and a resumed run matches.

    The epoch lives in shared memory, so loader workers that persist between epochs see it change.
    """

    seed: int = 0
    cache_report: CacheReport | None = None

    def __new__(cls, *args, **kwargs):
        dataset = super().__new__(cls)
        dataset._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        return dataset

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def item_seed(self, index: int) -> int:
        return hash((self.seed, self.epoch, index)) & 0x7FFFFFFF


@dataclass
class PredictInput:
    """One model input made from an image (an image may give several, e.g. one per box)."""

    image_index: int
    pixel_values: torch.Tensor
    meta: Any = None


class BoxRequest:
    """How a top-down task asks another task's model for the boxes it predicts in: which ``model``
    (of ``model_task``), with what options, which of its boxes to keep and the predict ``option`` they fill."""

    model: str  # a run folder, export or hub id (in the server: a served model's name)
    model_task: str
    option: str

    def check(self, info: ModelInfo, name: str) -> None:
        """Raise a clear error when the model ``name`` (described by ``info``) cannot give these boxes."""
        raise NotImplementedError

    def model_options(self) -> dict[str, Any]:
        """The predict options the box model is called with."""
        raise NotImplementedError

    def keep(self, predictions: list[dict[str, Any]]) -> list[list[list[float]]]:
        """The boxes to predict in, per image, from the box model's predictions."""
        raise NotImplementedError

    def refuse_given_boxes(self, options: dict[str, Any]) -> None:
        """Boxes given in ``options`` as well as a model to find them are a clear error."""
        given = options.get(self.option)
        if given is not None and (not isinstance(given, list) or any(value is not None for value in given)):
            raise VisionLoraError(f"give either {self.option!r} or a model finding them, not both")


class Task:
    """Shared behaviour of every task; subclasses override the hooks listed in the module."""

    name: str
    preset: Preset
    data_formats: tuple[str, ...]  # the formats (``data.formats.FORMATS``) this task reads, tried in order
    main_metric: str
    greater_is_better: bool = True
    auto_class: str  # the transformers Auto class that loads the task's models
    pipeline_tag: str  # the Hugging Face pipeline tag of the task, for model cards
    card_does: str  # what a trained model does, for its model card: "This model <card_does> N <label_noun>: ..."
    label_noun: str = "labels"
    fixed_labels: bool = False  # validation, test and evaluation data must have training's labels, in order
    fp16_unsafe: str | None = None  # why the task's models do not train in fp16, where auto would pick it
    weighs_classes: bool = False  # takes --class-weights auto (a class-weighted loss)
    predict_batch: int = 16
    predict_options: tuple[Option, ...] = ()
    writers: tuple[OutputWriter, ...] = (JSON_OUTPUT, DRAWN_IMAGES)
    demo: DemoRecipe | None = None  # the task's part of ``visionlora demo``
    box_options: tuple[Option, ...] = ()  # top-down: options naming a model that finds the boxes to predict in
    unbounded_metrics: tuple[str, ...] = ()  # metrics not in [0, 1] (e.g. pixel errors)
    input_names: tuple[str, ...] = ("pixel_values",)  # the model inputs predict feeds (and an export takes)
    output_names: tuple[str, ...] = ()  # the model outputs decode reads (and an export gives)
    dynamic_image_size: bool = False  # inputs keep their aspect ratio (padded), so exports take any height/width
    freeze_batchnorm_in_lora: bool = True  # BatchNorm statistics belong to the frozen base
    split_group = None  # key of a stratified validation split (e.g. the class)

    # -- data -------------------------------------------------------------------------
    def read_data(self, cfg) -> SourceData:
        """The annotations of ``cfg.data`` (no pixels yet), split into train and validation."""
        source, held_out = read_source(self.data_formats, cfg.data, cfg.val_data, cfg.seed, cfg.val_fraction,
                                       self.split_group, cfg.test_data)
        self.check_data(source, held_out, cfg.data)
        return source

    def read_part(self, path: str | Path) -> Part:
        """One folder (or file) of this task's data, read by the first of its formats that finds it there."""
        return read_part(self.data_formats, Path(path))

    def read_validation(self, summary: dict[str, Any], split: str = "val") -> Part:
        """Only the validation (or test) records of a finished run, from its summary (for ``evaluate RUN``)."""
        settings = summary["training"]
        return read_validation(self.data_formats, summary["data"], settings["data"], settings["seed"],
                               settings["val_fraction"], self.split_group, split)

    def read_evaluation(self, data: str, info: ModelInfo) -> Part:
        """Labelled records of ``data`` for ``evaluate --data``, checked against the model's labels."""
        part = read_evaluation_part(self.data_formats, data)
        if self.fixed_labels and list(part.labels) != info.labels:
            raise VisionLoraError(f"{data}: {self.label_noun} {part.labels} differ from the model's {info.labels}")
        unknown = sorted({name for name in part.labels if name not in info.labels})
        if unknown:
            raise VisionLoraError(f"{data}: labels the model was not trained on: {', '.join(unknown)}")
        return part

    def check_data(self, source: SourceData, held_out: list[Part], where: str) -> None:
        """Raise a clear error when the data cannot train this task; ``held_out`` are the
        validation and test parts as read (hook)."""
        for part in held_out if self.fixed_labels else []:
            if list(part.labels) != list(source.labels):
                raise VisionLoraError(f"{part.where}: {self.label_noun} {part.labels} differ from training's "
                                      f"{source.labels}")
        if not source.train:
            raise VisionLoraError(f"{where}: no training images")
        if not source.val:
            raise VisionLoraError(f"{where}: the validation split is empty; add images or use --val-data")

    def make_datasets(self, source: SourceData, processor, info: ModelInfo, cfg) -> Datasets:
        """Decode the images once: the (augmented) training and the plain validation dataset,
        kept where ``--cache`` says."""
        images = len(source.train) + len(source.val)
        plan = plan_cache(cfg.cache, cfg.cache_dir, images, self.image_bytes(processor, info))
        train, train_skipped = self.train_dataset(source, processor, info, cfg, plan)
        val, val_skipped = self.eval_dataset(source.val, processor, info, plan)
        test, test_skipped = self.eval_dataset(source.test, processor, info, plan) if source.test else (None, [])
        if len(train) == 0:
            raise VisionLoraError(f"{source.description.get('train', cfg.data)}: no usable training images")
        if len(val) == 0:
            raise VisionLoraError(f"{source.description.get('val', cfg.data)}: no usable validation images")
        counts = {**self.count(train, "train", info), **self.count(val, "val", info)}
        if test is not None:
            counts.update(self.count(test, "test", info))
        skipped = source.skipped + train_skipped + val_skipped + test_skipped
        report = train.cache_report
        report.merge(val.cache_report)
        if test is not None:
            report.merge(test.cache_report)
        report.reason = plan.report.reason
        return Datasets(train, val, counts, skipped, dict(source.description), report, test)

    def train_dataset(self, source: SourceData, processor, info: ModelInfo, cfg, cache: CachePlan):
        """(dataset, skipped files) for training; the dataset's ``cache_report`` says what decoding did (hook)."""
        raise NotImplementedError

    def eval_dataset(self, records: list[Any], processor, info: ModelInfo, cache: CachePlan | None = None):
        """(dataset, skipped files) of plain, model-ready items for evaluation (hook)."""
        raise NotImplementedError

    def image_bytes(self, processor, info: ModelInfo) -> int:
        """About how many bytes one prepared image takes, for ``--cache auto`` (hook)."""
        height, width = processor_output_size(processor)
        return height * width * 3

    def sample_weights(self, dataset) -> list[float]:
        """Per-item sampling weights for ``--balanced-sampler`` (hook; tasks without one refuse)."""
        raise VisionLoraError(f"--balanced-sampler is not available for {self.name}")

    def count(self, dataset, split: str, info: ModelInfo) -> dict[str, Any]:
        """Figures for the summary's data counts (hook; default: the number of items)."""
        return {split: len(dataset)}

    # -- model ------------------------------------------------------------------------
    def build_model(self, model_ref: str, labels: list[str], image_size: int | None, mode: str):
        """(model, processor, info): a built-in model, or a checkpoint loaded for ``labels``."""
        twin = pretrained_folder(self.name, model_ref) if is_builtin(model_ref) else None
        if twin is not None:
            model, processor = load_pretrained(self.model_class(), str(twin), **self.load_kwargs(str(twin), labels))
            self._check_twin_size(model_ref, processor, image_size)
        elif is_builtin(model_ref):
            model, processor = build_builtin(self.name, model_ref, labels, image_size)
        else:
            path, check = self.checkpoint(model_ref)
            model, processor = load_pretrained(self.model_class(), path, loading_check=check,
                                               **self.load_kwargs(model_ref, labels))
            if image_size:
                self.resize_processor(processor, image_size)
        info = ModelInfo(self.name, mode, model_ref, list(labels), processor_size(processor))
        if not is_builtin(model_ref):
            info.base_revision = base_revision(model_ref, current_policy().revision)
        self.describe_model(model, processor, info)
        return model, processor, info

    def _check_twin_size(self, name: str, processor, image_size: int | None) -> None:
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

    def checkpoint(self, ref: str):
        """(what to load for ``ref``, a check of transformers' loading report or None) (hook)."""
        return ref, None

    def load_kwargs(self, ref: str, labels: list[str]) -> dict[str, Any]:
        """``from_pretrained`` arguments that size the head for ``labels`` (hook)."""
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }

    def resize_processor(self, processor, image_size: int) -> None:
        """Make the processor produce ``image_size`` inputs (hook)."""
        set_processor_size(processor, image_size)

    def describe_model(self, model, processor, info: ModelInfo) -> None:
        """Record model facts in ``info`` (forward arguments, sizes) (hook)."""

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """Names of the freshly initialised head modules, trained and saved with an adapter."""
        raise NotImplementedError

    def prepare_for_training(self, model: torch.nn.Module, mode: str) -> None:
        """Called after ``model.train()`` each epoch: keeps BatchNorm statistics fixed in LoRA mode."""
        if mode == "lora" and self.freeze_batchnorm_in_lora:
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    # -- steps ------------------------------------------------------------------------
    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Stack dataset items into a batch (hook; default: stack every field with ``stacked``, which
        in a loader worker stacks into reused shared memory)."""
        return {key: stacked([torch.as_tensor(item[key]) for item in items], key) for key in items[0]}

    def device_batch(self, batch: dict[str, Any], normalizer: Normalizer) -> dict[str, Any]:
        """A loader batch, now on the model's device, made model-ready: its uint8 ``pixel_values``
        normalised in float32 (hook: tasks with other compact fields widen them too)."""
        batch["pixel_values"] = normalizer(batch["pixel_values"])
        return batch

    def loss(self, model, batch: dict[str, Any], info: ModelInfo) -> torch.Tensor:
        """The training loss of one (``device_batch``-ready) batch (hook)."""
        raise NotImplementedError

    def eval_step(self, model, batch: dict[str, Any], processor, info: ModelInfo) -> tuple[torch.Tensor, list[Any]]:
        """(mean loss of the batch, or None for a model that computes none, one output per item) (hook)."""
        raise NotImplementedError

    def metrics(self, dataset, indices: list[int], outputs: list[Any], info: ModelInfo) -> dict[str, Any]:
        """Metrics of the outputs for the dataset items ``indices``, in that order (hook)."""
        raise NotImplementedError

    def evaluate(self, model, processor, loader, accelerator, info: ModelInfo) -> dict[str, Any]:
        """Metrics over ``loader``, gathered across processes by dataset index, with ``loss``."""
        return self.evaluate_outputs(model, processor, loader, accelerator, info).metrics

    @torch.inference_mode()
    def evaluate_outputs(self, model, processor, loader, accelerator, info: ModelInfo) -> Evaluation:
        """``evaluate``'s metrics with the outputs behind them, in dataset order, in every process."""
        model.eval()
        normalizer = Normalizer(processor)
        found: dict[int, tuple[Any, float]] = {}
        for batch in loader:
            loss, outputs = self.eval_step(model, self.device_batch(batch, normalizer), processor, info)
            batch_loss = None if loss is None else float(loss)  # an exported model computes no loss
            rows = [(int(i), out, batch_loss) for i, out in zip(batch["index"].tolist(), outputs)]
            for index, output, batch_loss in accelerator.gather_for_metrics(rows, use_gather_object=True):
                found[index] = (output, batch_loss)
        indices = sorted(found)
        outputs = [found[i][0] for i in indices]
        losses = [found[i][1] for i in indices]
        metrics = {} if None in losses else {"loss": sum(losses) / max(len(indices), 1)}
        metrics.update(self.metrics(dataset_behind(loader), indices, outputs, info))
        return Evaluation(metrics, indices, outputs)

    def top1(self, output: torch.Tensor) -> torch.Tensor:
        """The discrete choices in a model output (the first of ``output_names``), to count how often two
        models agree (hook; default: the largest entry along the last axis, the class per image or query)."""
        return output.argmax(dim=-1)

    def diagnostics(self, dataset, indices: list[int], outputs: list[Any], info: ModelInfo) -> Diagnostics:
        """Per-class rows and plots of validation outputs, as ``metrics`` gets them (hook)."""
        return Diagnostics()

    # -- prediction -------------------------------------------------------------------
    def ground_truth(self, record, image: Image.Image, info: ModelInfo) -> tuple[dict[str, Any], dict[str, Any]]:
        """(a record's labels shaped like a prediction, so ``draw`` shows them; the predict
        options that ask about the same instances) (hook)."""
        raise NotImplementedError

    def caption(self, prediction: dict[str, Any]) -> str:
        """A short text for a prediction under its drawing in the grid (hook; default none)."""
        return ""

    def predict_inputs(self, image: Image.Image, image_index: int, processor, info: ModelInfo,
                       options: dict[str, Any]) -> list[PredictInput]:
        """The model inputs one image gives (hook)."""
        raise NotImplementedError

    def model_inputs(self, pixels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch the inputs' pixels for the model (hook; default: stack them)."""
        return {"pixel_values": torch.stack(pixels)}

    def decode(self, outputs, inputs: list[PredictInput], images: Sequence[Image.Image], processor,
               info: ModelInfo, options: dict[str, Any]) -> list[Any]:
        """JSON-ready results, one per input (hook)."""
        raise NotImplementedError

    def default_options(self) -> dict[str, Any]:
        """Each predict option at its default."""
        return {option.name: option.default for option in self.predict_options}

    def box_request(self, values: dict[str, Any]) -> BoxRequest | None:
        """From ``box_options``' values, what to ask a box-finding model; None when none is named (hook)."""
        return None

    def combine(self, results: list[Any]) -> dict[str, Any]:
        """One image's prediction from the results of its inputs (default: the one result)."""
        return results[0]

    def predict(self, model, processor, images: Sequence[Image.Image], info: ModelInfo, **options: Any) -> list[dict]:
        """JSON-ready predictions for RGB images, batched ``predict_batch`` inputs at a time."""
        return self.predict_mixed(model, images, [PredictView(None, processor, info)] * len(images), **options)

    @torch.inference_mode()
    def predict_mixed(self, model, images: Sequence[Image.Image], views: Sequence[PredictView],
                      **options: Any) -> list[dict]:
        """Predictions for ``images``, each by its own view (adapter, processor, labels) of one model.

        Inputs whose views preprocess alike share forwards; views naming adapters run them as
        a mixed-adapter batch (``adapter_names``), and each view's rows decode with its own labels.
        """
        if getattr(model, "training", True):  # eval() walks every module: only when needed
            model.eval()
        options = {**self.default_options(), **options}
        inputs = [item for index, (image, view) in enumerate(zip(images, views))
                  for item in self.predict_inputs(image, index, view.processor, view.info, options)]
        per_image: list[list[Any]] = [[] for _ in images]
        for chunk in _chunks(inputs, views, self.predict_batch):
            chunk_views = [views[item.image_index] for item in chunk]
            batch = {k: v.to(model.device) for k, v in self.model_inputs([item.pixel_values for item in chunk]).items()}
            adapters = [view.adapter for view in chunk_views]
            with mixed_rows(model, adapters) if adapters[0] is not None else nullcontext():
                outputs = model(**batch, **chunk_views[0].info.forward_kwargs)
            for view, rows in _rows_by_view(chunk_views):
                part = outputs if len(rows) == len(chunk) else select_rows(outputs, torch.tensor(rows), len(chunk))
                items = [chunk[row] for row in rows]
                for item, result in zip(items, self.decode(part, items, images, view.processor, view.info, options)):
                    per_image[item.image_index].append(result)
        return [self.combine(results) for results in per_image]

    def draw(self, image: Image.Image, prediction: dict, info: ModelInfo) -> Image.Image:
        """A copy of ``image`` with ``prediction`` drawn on it (hook)."""
        raise NotImplementedError

    def exact_outputs(self, model) -> bool:
        """Whether an exported model's raw outputs must equal torch's (hook; False where
        near-tied scores may pick other queries, so only the decoded predictions can agree)."""
        return True


def dataset_behind(loader) -> torch.utils.data.Dataset:
    """The dataset a (possibly wrapped or sharded) data loader reads from."""
    dataset = loader.dataset
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


@dataclass(frozen=True, eq=False)
class PredictView:
    """How one image is predicted in a mixed batch: the adapter (None: the model as it is), the
    processor preparing it and the run description decoding it."""

    adapter: str | None
    processor: Any
    info: ModelInfo
    batch_key: str = ""  # views with equal keys preprocess alike (same input size) and share forwards


def _chunks(inputs: list[PredictInput], views: Sequence[PredictView], size: int) -> list[list[PredictInput]]:
    """Inputs in order, grouped by their view's batch key, at most ``size`` a chunk."""
    groups: dict[str, list[PredictInput]] = {}
    for item in inputs:
        groups.setdefault(views[item.image_index].batch_key, []).append(item)
    return [group[start : start + size] for group in groups.values() for start in range(0, len(group), size)]


def _rows_by_view(views: list[PredictView]) -> list[tuple[PredictView, list[int]]]:
    rows: dict[int, tuple[PredictView, list[int]]] = {}
    for row, view in enumerate(views):
        rows.setdefault(id(view), (view, []))[1].append(row)
    return list(rows.values())
