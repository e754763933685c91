"""What a task provides to the engine: the protocol, its LoRA preset, and model info.

A task turns user data into datasets, builds or loads the model, computes the loss,
evaluates, and predicts. The engine, the CLI and inference only talk to this protocol.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
from PIL import Image


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
class Datasets:
    """The training and validation datasets of a run, and what reading them skipped."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    counts: dict[str, Any]
    skipped: list[dict[str, str]]
    description: dict[str, Any]


class Task(Protocol):
    """The hooks a task fills; the engine owns the loop, saving and reporting."""

    name: str
    preset: Preset
    main_metric: str
    greater_is_better: bool

    def read_data(self, cfg) -> Any:
        """Read the annotations of ``cfg.data`` (no pixels yet); the result has ``.labels``."""

    def build_model(self, model_ref: str, labels: list[str], image_size: int | None) -> tuple[torch.nn.Module, Any, ModelInfo]:
        """Build (``tiny``) or load the base model and its image processor."""

    def load_model(self, path: str, info: ModelInfo) -> torch.nn.Module:
        """Load a saved base or fully trained model for ``info``'s labels."""

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """Names of the freshly initialised head modules, trained and saved with an adapter."""

    def make_datasets(self, source: Any, processor, info: ModelInfo, cfg) -> Datasets:
        """Decode the images once; return the augmented train and the plain val dataset."""

    def make_eval_dataset(self, data: str, processor, info: ModelInfo) -> tuple[torch.utils.data.Dataset, list[dict]]:
        """A dataset of labelled images from ``data`` for ``evaluate``, and its skip list."""

    def collate(self, items: Sequence[Any]) -> dict[str, Any]:
        """Stack dataset items into a batch."""

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], info: ModelInfo) -> torch.Tensor:
        """The training loss of one batch."""

    def evaluate(self, model: torch.nn.Module, loader, accelerator, info: ModelInfo) -> dict[str, Any]:
        """Metrics over ``loader`` (gathered across processes), including ``loss``."""

    def predict(
        self, model: torch.nn.Module, processor, images: Sequence[Image.Image], info: ModelInfo, **options: Any
    ) -> list[dict]:
        """JSON-ready predictions for RGB images (``options``: e.g. a score threshold)."""

    def draw(self, image: Image.Image, prediction: dict, info: ModelInfo) -> Image.Image:
        """A copy of ``image`` with ``prediction`` drawn on it."""


def dataset_behind(loader, kind: type) -> Any:
    """The ``kind`` dataset a (possibly wrapped or sharded) data loader reads from."""
    dataset = loader.dataset
    while not isinstance(dataset, kind):
        dataset = dataset.dataset
    return dataset
