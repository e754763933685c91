"""The task contract's records: a preset, a demo recipe, a run's description (``ModelInfo``) and
its task state, evaluation results, datasets, model inputs, box requests, and the declarations every
task answers (``TaskDeclarations``). The roles (:mod:`visionlora.tasks.roles`) and the task class
(:mod:`visionlora.tasks.base`) build on them."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from visionlora.core.labelling import LabelFormat
from visionlora.core.outputs import DRAWN_IMAGES, JSON_OUTPUT, Option, OutputWriter
from visionlora.data.cache import CacheReport
from visionlora.errors import VisionLoraError
from visionlora.lazy import import_object
from visionlora.modeling.builtin import BuiltinModel, label_maps


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


StateT = TypeVar("StateT", bound="TaskState")


@dataclass
class TaskState:
    """What a task learns about a run beyond its labels and input size (each task's own fields),
    saved in ``visionlora.json`` under ``extra``. The base has none."""

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (None ones are left out, as runs have always saved them)."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls: type[StateT], data: dict[str, Any]) -> StateT:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass
class ModelInfo:
    """What is needed to rebuild and use a trained model; saved as ``visionlora.json``."""

    task: str
    mode: str
    base_model: str
    labels: list[str]
    image_size: dict[str, int]
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    state: TaskState = field(default_factory=TaskState)  # the task's own facts, saved as "extra"
    base_revision: str | None = None  # the hub commit or content hash of the base's weights
    format_version: int = 1

    @property
    def id2label(self) -> dict[int, str]:
        return label_maps(self.labels)["id2label"]

    @property
    def label2id(self) -> dict[str, int]:
        return label_maps(self.labels)["label2id"]

    def to_dict(self) -> dict[str, Any]:
        data = {("extra" if f.name == "state" else f.name): copy.deepcopy(getattr(self, f.name))
                for f in dataclasses.fields(self)}
        data["extra"] = self.state.to_dict()
        data["id2label"] = {str(i): name for i, name in self.id2label.items()}
        data["label2id"] = self.label2id
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], state_type: type[TaskState] = TaskState) -> ModelInfo:
        """A description read back; its task's state is ``state_type`` (``tasks.read_model_info`` picks it)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"state"}
        state = state_type.from_dict(data.get("extra") or {})
        return cls(**{k: v for k, v in data.items() if k in names}, state=state)


@dataclass
class ModelFacts:
    """What a task reads off a loaded model: arguments its forward needs, and its first state."""

    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    state: TaskState = field(default_factory=TaskState)


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
    _epoch: torch.Tensor  # one int64 in shared memory

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
class LabelIssue:
    """How well a record's labels agree with a prediction made by a model that never saw it: a quality
    score (lower: likelier wrong) and whether the task flags it as a likely label error, with why."""

    score: float
    flagged: bool
    message: str = ""


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

    def options(self, predictions: list[dict[str, Any]]) -> dict[str, Any]:
        """The predict options the box model's predictions give, each a list with one value per
        image: the kept boxes as ``option``."""
        return {self.option: self.keep(predictions)}

    def refuse_given_boxes(self, options: dict[str, Any]) -> None:
        """Boxes given in ``options`` as well as a model to find them are a clear error."""
        given = options.get(self.option)
        if given is not None and (not isinstance(given, list) or any(value is not None for value in given)):
            raise VisionLoraError(f"give either {self.option!r} or a model finding them, not both")


class TaskDeclarations:
    """What a task declares: the answers the engines, the command line and the server read."""

    name: ClassVar[str]
    preset: ClassVar[Preset]
    data_formats: ClassVar[tuple[str, ...]]  # the formats (``data.formats.FORMATS``) it reads, tried in order
    main_metric: ClassVar[str]
    greater_is_better: ClassVar[bool] = True
    auto_class: ClassVar[str]  # the transformers Auto class that loads the task's models
    pipeline_tag: ClassVar[str]  # the Hugging Face pipeline tag of the task, for model cards
    card_does: ClassVar[str]  # for the model card: "This model <card_does> N <label_noun>: ..."
    label_noun: ClassVar[str] = "labels"
    fixed_labels: ClassVar[bool] = False  # held-out and evaluation data must have training's labels, in order
    fp16_unsafe: ClassVar[str | None] = None  # why its models do not train in fp16, where auto would pick it
    weighs_classes: ClassVar[bool] = False  # takes --class-weights auto (a class-weighted loss)
    predict_batch: ClassVar[int] = 16
    predict_options: ClassVar[tuple[Option, ...]] = ()
    writers: ClassVar[tuple[OutputWriter, ...]] = (JSON_OUTPUT, DRAWN_IMAGES)
    label_formats: ClassVar[tuple[LabelFormat, ...]] = ()  # pre-labels for labelling tools (predict --format)
    demo: ClassVar[DemoRecipe | None] = None  # the task's part of ``visionlora demo``
    builtin_models: ClassVar[tuple[BuiltinModel, ...]] = ()  # ``--model tiny`` and friends, built offline
    box_options: ClassVar[tuple[Option, ...]] = ()  # top-down: options naming a model that finds the boxes
    unbounded_metrics: ClassVar[tuple[str, ...]] = ()  # metrics not in [0, 1] (e.g. pixel errors)
    input_names: ClassVar[tuple[str, ...]] = ("pixel_values",)  # the inputs predict feeds (and an export takes)
    output_names: ClassVar[tuple[str, ...]] = ()  # the model outputs decode reads (and an export gives)
    dynamic_image_size: ClassVar[bool] = False  # inputs keep their aspect ratio (padded): exports take any size
    freeze_batchnorm_in_lora: ClassVar[bool] = True  # BatchNorm statistics belong to the frozen base
    state_type: ClassVar[type[TaskState]] = TaskState  # the task's own facts about a run


def task_state(info: ModelInfo, kind: type[StateT]) -> StateT:
    """``info``'s state, checked to be of the ``kind`` its task keeps."""
    if not isinstance(info.state, kind):
        raise VisionLoraError(f"a {info.task} run's state is {type(info.state).__name__}, not {kind.__name__}")
    return info.state
