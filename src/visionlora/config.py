"""Training settings: one dataclass, its defaults, YAML loading and validation.

Every field is also a command-line flag (``lora_r`` -> ``--lora-r``) and a key of
the YAML file given with ``--config``. Values come, lowest priority first, from the
field defaults, the task's preset, the YAML file, then the flags.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from visionlora.data.splits import parse_fold
from visionlora.errors import VisionLoraError
from visionlora.modeling.adapters import METHODS
from visionlora.runtime import DEVICE_PATTERN, DEVICES
from visionlora.tasks import DEFAULT_TASK, get_task

# tracker name -> (module it needs, pip package to install)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
MODES = ("lora", "full")
PRECISIONS = ("auto", "no", "fp16", "bf16")
DEFAULT_VAL_FRACTION = 0.2
CACHE_MODES = ("auto", "ram", "disk", "none")


def _opt(default, help, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything a training run needs; ``None`` means 'use the task preset'."""

    task: str = _opt(DEFAULT_TASK, "task to train (see the task list in --help)")
    data: str | None = _opt(None, "dataset folder, saved Hugging Face dataset folder, or hub dataset id")
    val_data: str | None = _opt(None, "separate validation data (default: the data's val split, or a seeded split)")
    test_data: str | None = _opt(None, "held-out test data, evaluated once at the end (default: the data's test/ part; "
                                  "none: no test part)")
    model: str | None = _opt(None, "hub id, local checkpoint folder, or 'tiny' (small random model, offline)")
    revision: str | None = _opt(None, "hub revision of --model (branch, tag or commit); the commit used is recorded")
    init_from: str | None = _opt(None, "start from a finished run's trained weights (its adapter, or its full model)")
    mode: str = _opt("lora", "lora: train a LoRA adapter; full: train every weight", choices=MODES)
    method: str = _opt("lora", "the adapter of --mode lora: lora, dora (weight-decomposed LoRA), loha, lokr, "
                       "or oft (--lora-r is its block size)", choices=METHODS)
    epochs: int = _opt(10, "training epochs")
    batch_size: int = _opt(8, "images per batch (per process)")
    lr: float | None = _opt(None, "peak learning rate (preset: 2e-4 for LoRA)")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    warmup_ratio: float = _opt(0.1, "fraction of the steps spent warming the learning rate up")
    grad_clip: float = _opt(1.0, "clip gradients to this global norm (0 = off)")
    grad_accum: int = _opt(1, "batches accumulated per optimizer step")
    mixed_precision: str = _opt(
        "auto", "auto (bf16 where the hardware runs it natively, else fp16 on older GPUs, else fp32), "
        "no (fp32), fp16 (GPU) or bf16", choices=PRECISIONS)
    device: str = _opt("auto", "where to train: auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, cuda:N "
                       "(GPU N) or mps; several processes train on cuda:LOCAL_RANK (choose with CUDA_VISIBLE_DEVICES)")
    lora_r: int | None = _opt(None, "LoRA rank (preset per task)")
    lora_alpha: float | None = _opt(None, "LoRA alpha (preset per task)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input")
    target_modules: list[str] | None = _opt(
        None, "comma-separated module names to adapt, e.g. query,value (preset per task)"
    )
    image_size: int | None = _opt(None, "model input size in pixels (default: the model's own)")
    class_weights: str = _opt("none", "classification: auto weighs the loss by inverse class frequency; none",
                              choices=("auto", "none"))
    balanced_sampler: bool = _opt(False, "draw training images in inverse proportion to their class's frequency "
                                  "(classification), or by repeat-factor sampling (detection)")
    augment: bool = _opt(True, "random training augmentation (crop/flip/colour, task-aware); --no-augment turns it off")
    val_fraction: float | None = _opt(
        None, "share held out for validation when the data has no val split (0.2; DeepLabCut: its TrainingFraction)"
    )
    fold: str | None = _opt(None, "cross-validation: I/K validates on fold I of K seeded folds of the training and "
                            "validation records pooled, and trains on the others (e.g. 2/5)")
    save_every: int = _opt(200, "also checkpoint every N optimizer steps (0 = only at epoch ends), for --resume")
    patience: int = _opt(0, "stop after this many epochs without a better validation metric (0 = off)")
    seed: int = _opt(42, "random seed for splits, initialisation, augmentation and order")
    num_workers: str = _opt("auto", "data-loading worker processes, or auto: on CUDA one per core less one (at most "
                            "8, with pinned memory and non-blocking copies); on a CPU none, as the model uses "
                            "every core")
    cache: str = _opt("auto", "where decoded images are kept: auto (RAM if they fit a quarter of the available "
                      "memory, else disk), ram, disk (reused by later runs) or none (decoded for every batch)",
                      choices=CACHE_MODES)
    cache_dir: str | None = _opt(None, "folder of the disk cache (default ~/.cache/visionlora)")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (for smoke runs on big data)")
    low_memory: bool = _opt(
        False, "lower peak RAM: on a CPU, hand freed memory back to the system at once (LoRA most; steps ~20%% "
               "slower); under bf16, keep a LoRA run's fp32 frozen weights on disk until training ends"
    )
    allow_pickle: bool = _opt(False, "allow pickled .bin checkpoints (they can run code); safetensors only otherwise")
    trust_remote_code: bool = _opt(False, "allow a hub model to run its own code")
    output: str | None = _opt(None, "run folder (default: runs/<task>/<mode>[-N])")
    overwrite: bool = _opt(False, "replace an existing run folder")
    progress: bool = _opt(True, "show a progress bar")
    figures: bool = _opt(True, "draw the run's figures (plots, the grid of predictions) and per_class.csv; "
                         "--no-figures leaves them out of a quick run (the summary, report and model card stay)")
    report_to: str = _opt("none", "log losses, learning rate and metrics to tensorboard, mlflow and/or wandb "
                          "(comma-separated; through Accelerate's trackers, under RUN/tracking), or none")

    def validate(self) -> TrainConfig:
        """Raise a one-line error for an impossible setting; return self."""
        if not self.data:
            raise VisionLoraError("no training data: pass --data PATH (or 'data:' in the --config file)")
        checks = [
            (self.mode in MODES, f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}"),
            (self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, not {self.method!r}"),
            (self.method == "lora" or self.mode == "lora",
             f"--method {self.method} is an adapter: use it with --mode lora"),
            (self.mixed_precision in PRECISIONS, f"--mixed-precision must be one of {', '.join(PRECISIONS)}"),
            (DEVICE_PATTERN.fullmatch(str(self.device).strip().lower()) is not None,
             f"--device must be one of {DEVICES}, not {self.device!r}"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.lr is None or self.lr > 0, "--lr must be positive"),
            (self.lora_r is None or self.lora_r >= 1, "--lora-r must be at least 1"),
            (self.lora_alpha is None or self.lora_alpha > 0, "--lora-alpha must be positive"),
            (0.0 <= self.lora_dropout < 1.0, "--lora-dropout must be in [0, 1)"),
            (0.0 <= self.warmup_ratio < 1.0, "--warmup-ratio must be in [0, 1)"),
            (self.val_fraction is None or 0.0 < self.val_fraction < 1.0, "--val-fraction must be between 0 and 1"),
            (self.image_size is None or self.image_size >= 8, "--image-size must be at least 8"),
            (self.patience >= 0, "--patience must be 0 (off) or more"),
            (self.save_every >= 0, "--save-every must be 0 (epoch ends only) or more"),
            (str(self.num_workers) == "auto" or str(self.num_workers).isdigit(),
             f"--num-workers must be auto or a number of processes, not {self.num_workers!r}"),
            (self.cache in CACHE_MODES, f"--cache must be one of {', '.join(CACHE_MODES)}"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.class_weights in ("auto", "none"), "--class-weights must be auto or none"),
            (self.class_weights == "none" or get_task(self.task).weighs_classes,
             f"--class-weights: the {self.task} task has no class-weighted loss"),
        ]
        for ok, message in checks:
            if not ok:
                raise VisionLoraError(message)
        parse_report_to(self.report_to)
        if self.fold is not None:
            parse_fold(self.fold)
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Settings saved by a run (keys this version does not know are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def holdout(self) -> float:
        """The validation share to split off when the data has no validation part."""
        return self.val_fraction if self.val_fraction is not None else DEFAULT_VAL_FRACTION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields() -> list[dataclasses.Field]:
    """The fields of :class:`TrainConfig`, in declaration order."""
    return list(dataclasses.fields(TrainConfig))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML settings file; keys may use dashes or underscores."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise VisionLoraError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise VisionLoraError(f"{path}{where}: not valid YAML") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise VisionLoraError(f"{path}: expected a mapping of setting: value")
    known = {f.name for f in config_fields()}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise VisionLoraError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
        values[name] = value
    return values


def coerce(name: str, value: Any) -> Any:
    """Bring a YAML value to the field's type (lists may be comma strings)."""
    if value is None:
        return None
    fld = next(f for f in config_fields() if f.name == name)
    kind = str(fld.type)
    try:
        if "list" in kind:
            if isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            return [str(v) for v in value]
        if "bool" in kind:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if "int" in kind and "float" not in kind:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if "float" in kind:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise VisionLoraError(f"setting {name!r}: {value!r} is not a valid {kind}") from None


def build_config(yaml_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Merge defaults < task preset < YAML < flags into a validated config."""
    merged: dict[str, Any] = {}
    for source in (yaml_values, flag_values):
        for name, value in source.items():
            if value is not None:
                merged[name] = coerce(name, value)
    return with_preset(TrainConfig(**merged)).validate()


def with_preset(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the settings it leaves unset (None) taken from its task's preset for its mode."""
    preset = get_task(cfg.task).preset.settings(cfg.mode)
    return dataclasses.replace(cfg, **{name: coerce(name, value) for name, value in preset.items()
                                       if getattr(cfg, name) is None})


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """The trackers named by ``--report-to`` (comma-separated, or none); unknown or uninstalled
    ones are a one-line error."""
    names = value if isinstance(value, list) else [v.strip() for v in str(value or "none").split(",") if v.strip()]
    names = [name for name in names if name != "none"]
    for name in names:
        if name not in TRACKERS:
            raise VisionLoraError(f"--report-to {name}: unknown tracker (choose from {', '.join(TRACKERS)}, or none)")
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise VisionLoraError(f"--report-to {name}: {module} is not installed (pip install {package})")
    return names
