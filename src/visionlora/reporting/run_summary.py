"""The finished run's summary as types: what ``training_summary.json`` holds, and what the model
card, the report and ``compare`` read.

``RunSummary.to_dict()`` is the JSON file's layout (see the README's "What a run writes");
``RunSummary.from_dict()`` reads it back, older files' missing sections as their defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataSummary:
    """Where the data came from, how much of it there was and what reading it left out."""

    description: dict[str, Any]  # the readers' account: format, train, val, test, notes, ... and task facts
    counts: dict[str, Any]
    skipped_count: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    cache: dict[str, Any] | None = None

    @property
    def format(self) -> str | None:
        return self.description.get("format")

    @property
    def notes(self) -> list[str]:
        return self.description.get("notes", [])

    def source(self, split: str) -> str | None:
        """Where the ``train``, ``val`` or ``test`` part came from (None: no such part)."""
        return self.description.get(split)

    def to_dict(self) -> dict[str, Any]:
        return {**self.description, "counts": self.counts, "skipped_count": self.skipped_count,
                "skipped": self.skipped, "cache": self.cache}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSummary:
        own = {"counts", "skipped_count", "skipped", "cache"}
        return cls({k: v for k, v in data.items() if k not in own}, data.get("counts", {}),
                   data.get("skipped_count", 0), data.get("skipped", []), data.get("cache"))


@dataclass
class TrainingSummary:
    """The run's settings (its ``TrainConfig``) and how the loop went."""

    settings: dict[str, Any]
    epochs_run: int
    early_stopped: bool
    optimizer_steps: int
    data_loading: dict[str, Any] | None = None  # workers, pinning, prefetch and why (absent in older runs)

    @property
    def epochs(self) -> int:
        return self.settings["epochs"]

    def to_dict(self) -> dict[str, Any]:
        loading = {"data_loading": self.data_loading} if self.data_loading is not None else {}
        return {**self.settings, "epochs_run": self.epochs_run, "early_stopped": self.early_stopped,
                "optimizer_steps": self.optimizer_steps, **loading}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSummary:
        loop = {"epochs_run", "early_stopped", "optimizer_steps", "data_loading"}
        return cls({k: v for k, v in data.items() if k not in loop}, data.get("epochs_run", 0),
                   data.get("early_stopped", False), data.get("optimizer_steps", 0), data.get("data_loading"))


@dataclass
class AdapterSummary:
    """The adapter as asked for (method, r, alpha, dropout, targets) and as applied (modules, layers)."""

    requested: dict[str, Any]
    resolved: dict[str, Any]

    @property
    def method(self) -> str:
        return self.requested.get("method", "lora")


@dataclass
class ParameterCounts:
    total: int
    trainable: int
    trainable_percent: float


@dataclass
class Sizes:
    saved_model_bytes: int
    weights_file_bytes: int | None
    base_model_bytes: int


@dataclass
class Headline:
    """The number to quote: the test part's main metric when there is one, else validation's."""

    split: str
    metric: str
    value: float | None
    validation_value: float | None = None  # with a test split: validation's figure beside it


@dataclass
class Timing:
    """How long the run took: in all, in its training steps, and in each part of the run
    (``phases``, in the order they ran: what a short run spends outside its steps)."""

    wall_seconds: float
    train_seconds: float
    train_images_per_second: float
    started_at: float | None = None  # the run's start, seconds since the epoch (absent in older runs)
    phases: dict[str, float] = field(default_factory=dict)  # seconds of each part (absent in older runs)


@dataclass
class RunSummary:
    """A finished run: what it trained, on what, how, and with which results."""

    task: str
    mode: str
    base_model: str
    run_dir: str
    data: DataSummary
    training: TrainingSummary
    parameters: ParameterCounts
    sizes: Sizes
    main_metric: str
    metrics: dict[str, Any]  # the best weights' on validation, in ``metrics_precision``
    headline: Headline
    time: Timing
    memory: dict[str, int]  # peak_rss_bytes, and peak_accelerator_bytes on an accelerator
    versions: dict[str, str]
    completed: bool = True
    base_revision: str | None = None
    init_from: dict[str, Any] | None = None
    initial_metrics: dict[str, Any] | None = None
    lora: AdapterSummary | None = None
    mixed_precision: str = "fp32"
    mixed_precision_reason: str = ""
    best_epoch: int | None = None
    test_metrics: dict[str, Any] | None = None
    metrics_in_training_precision: dict[str, Any] = field(default_factory=dict)
    metrics_precision: str = "fp32"  # the precision of the pass that gave ``metrics``

    ORDER = ("completed", "task", "mode", "base_model", "base_revision", "init_from", "initial_metrics", "run_dir",
             "data", "training", "lora", "parameters", "sizes", "mixed_precision", "mixed_precision_reason",
             "main_metric", "best_epoch", "metrics", "metrics_precision", "test_metrics", "headline",
             "metrics_in_training_precision", "time", "memory", "versions")

    @property
    def method(self) -> str:
        """``lora``, ``dora``, ... for an adapter run, ``full`` for a full one."""
        return self.lora.method if self.lora else self.mode

    def to_dict(self) -> dict[str, Any]:
        """The layout of ``training_summary.json``."""
        values = {name: getattr(self, name) for name in self.ORDER}
        values["data"], values["training"] = self.data.to_dict(), self.training.to_dict()
        for name in ("lora", "parameters", "sizes", "time"):
            if values[name] is not None:
                values[name] = dataclasses.asdict(values[name])
        values["headline"] = {k: v for k, v in dataclasses.asdict(self.headline).items()
                              if k != "validation_value" or self.headline.split == "test"}
        return values

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        """A summary as ``training_summary.json`` holds it."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["data"] = DataSummary.from_dict(data["data"])
        values["training"] = TrainingSummary.from_dict(data["training"])
        values["lora"] = AdapterSummary(**data["lora"]) if data.get("lora") else None
        values["parameters"] = ParameterCounts(**data["parameters"])
        values["sizes"] = Sizes(**data["sizes"])
        values["time"] = Timing(**data["time"])
        main = data["main_metric"]
        values["headline"] = Headline(**data["headline"]) if data.get("headline") else Headline(
            "validation", main, data["metrics"].get(main))
        return cls(**values)
