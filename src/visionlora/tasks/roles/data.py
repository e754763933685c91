"""The data role: read a task's annotations, check them, build its datasets, and the state the
training data teaches the run (``TaskState``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Hashable

import torch

from visionlora.data.cache import CachePlan, plan_cache
from visionlora.data.formats import read_evaluation_part, read_part, read_source, read_validation
from visionlora.data.records import Part, SourceData
from visionlora.data.transforms import processor_output_size
from visionlora.errors import VisionLoraError
from visionlora.tasks.records import Datasets, ModelInfo, TaskDeclarations, TaskState

Dataset = torch.utils.data.Dataset
Built = tuple[Any, list[dict[str, str]]]  # (dataset with a ``cache_report``, files skipped)


class TaskData:
    """Hooks: ``train_dataset`` and ``eval_dataset`` (required); ``check_data``, ``state_from_data``,
    ``state_from_training_set``, ``image_bytes``, ``sample_weights``, ``count``, ``record_classes``,
    ``check_record`` (defaults)."""

    def __init__(self, task: TaskDeclarations) -> None:
        self.task = task

    def read_data(self, cfg: Any) -> SourceData:
        """The annotations of ``cfg.data`` (no pixels yet), split into train and validation."""
        task = self.task
        source, held_out = read_source(task.data_formats, cfg.data, cfg.val_data, cfg.seed, cfg.val_fraction,
                                       self.split_group(), cfg.test_data, getattr(cfg, "fold", None))
        self.check_data(source, held_out, cfg.data)
        return source

    def read_part(self, path: str | Path) -> Part:
        """One folder (or file) of this task's data, read by the first of its formats that finds it there."""
        return read_part(self.task.data_formats, Path(path))

    def read_validation(self, summary: dict[str, Any], split: str = "val") -> Part:
        """Only the validation (or test) records of a finished run, from its summary (for ``evaluate RUN``)."""
        settings = summary["training"]
        return read_validation(self.task.data_formats, summary["data"], settings["data"], settings["seed"],
                               settings["val_fraction"], self.split_group(), split, settings.get("fold"),
                               settings.get("val_data"))

    def read_evaluation(self, data: str, info: ModelInfo) -> Part:
        """Labelled records of ``data`` for ``evaluate --data``, checked against the model's labels."""
        part = read_evaluation_part(self.task.data_formats, data)
        if self.task.fixed_labels and list(part.labels) != info.labels:
            raise VisionLoraError(f"{data}: {self.task.label_noun} {part.labels} differ from the model's {info.labels}")
        unknown = sorted({name for name in part.labels if name not in info.labels})
        if unknown:
            raise VisionLoraError(f"{data}: labels the model was not trained on: {', '.join(unknown)}")
        return part

    def record_classes(self, record: Any) -> list[str]:
        """The class names a record holds, one per example, for ``visionlora check``'s class balance (hook;
        default none: the task's labels are not classes to count)."""
        return []

    def check_record(self, record: Any, image_size: tuple[int, int], labels: list[str]) -> list[str]:
        """What is wrong with a record's labels given its image's decoded (width, height) and the part's
        label names, one message each, for ``visionlora check`` (hook; default: nothing)."""
        return []

    def split_group(self) -> Callable[[Any], Hashable] | None:
        """The key a stratified validation split keeps in proportion (e.g. a record's class), or None
        for a plain random split (hook)."""
        return None

    def check_data(self, source: SourceData, held_out: list[Part], where: str) -> None:
        """Raise a clear error when the data cannot train this task; ``held_out`` are the
        validation and test parts as read (hook)."""
        for part in held_out if self.task.fixed_labels else []:
            if list(part.labels) != list(source.labels):
                raise VisionLoraError(f"{part.where}: {self.task.label_noun} {part.labels} differ from training's "
                                      f"{source.labels}")
        if not source.train:
            raise VisionLoraError(f"{where}: no training images")
        if not source.val:
            raise VisionLoraError(f"{where}: the validation split is empty; add images or use --val-data")

    def make_datasets(self, source: SourceData, processor: Any, info: ModelInfo, cfg: Any) -> Datasets:
        """Decode the images once: the (augmented) training and the plain validation dataset, kept
        where ``--cache`` says. ``info.state`` takes what the data teaches, in this order: from the
        annotations before decoding, then from the training set before the held-out sets are built."""
        images = len(source.train) + len(source.val)
        plan = plan_cache(cfg.cache, cfg.cache_dir, images, self.image_bytes(processor, info))
        info.state = self.state_from_data(source, info, cfg)
        train, train_skipped = self.train_dataset(source, processor, info, cfg, plan)
        info.state = self.state_from_training_set(train, info, cfg)
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
        for held_out in (val, test):
            if held_out is not None:
                report.merge(held_out.cache_report)
        report.reason = plan.report.reason
        return Datasets(train, val, counts, skipped, dict(source.description), report, test)

    def state_from_data(self, source: SourceData, info: ModelInfo, cfg: Any) -> TaskState:
        """The run's state once the annotations are read, before any image is decoded (hook;
        default: as the model left it)."""
        return info.state

    def state_from_training_set(self, train: Any, info: ModelInfo, cfg: Any) -> TaskState:
        """The run's state once the training set is built, before the held-out sets are (hook;
        default: unchanged)."""
        return info.state

    def train_dataset(self, source: SourceData, processor: Any, info: ModelInfo, cfg: Any, cache: CachePlan) -> Built:
        """(dataset, skipped files) for training; the dataset's ``cache_report`` says what decoding did (hook)."""
        raise NotImplementedError

    def eval_dataset(self, records: list[Any], processor: Any, info: ModelInfo,
                     cache: CachePlan | None = None) -> Built:
        """(dataset, skipped files) of plain, model-ready items for evaluation (hook)."""
        raise NotImplementedError

    def image_bytes(self, processor: Any, info: ModelInfo) -> int:
        """About how many bytes one prepared image takes, for ``--cache auto`` (hook)."""
        height, width = processor_output_size(processor)
        return height * width * 3

    def sample_weights(self, dataset: Any) -> list[float]:
        """Per-item sampling weights for ``--balanced-sampler`` (hook; tasks without one refuse)."""
        raise VisionLoraError(f"--balanced-sampler is not available for {self.task.name}")

    def count(self, dataset: Any, split: str, info: ModelInfo) -> dict[str, Any]:
        """Figures for the summary's data counts (hook; default: the number of items)."""
        return {split: len(dataset)}
