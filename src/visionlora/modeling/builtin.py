"""Built-in small models, for trying things offline and for tests: ``--model tiny`` and friends.

``tiny`` and ``tiny-rtdetr`` are built from a config with random weights and their matching
image processor. Each has a ``-pretrained`` twin: the same architecture after visionlora's
own full training on a procedural corpus (``scripts/pretrain_builtins.py``), shipped as a
small checkpoint folder under ``visionlora/pretrained/`` and loaded like any checkpoint.
They are fixtures, not task logic: each task declares its own, and this module builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from visionlora.errors import VisionLoraError
from visionlora.lazy import import_object


@dataclass(frozen=True)
class BuiltinModel:
    """A named small model of one task: ``builder`` ("module:function") builds
    ``(model, processor)`` from ``(labels, image_size)``; its module is imported when asked for.
    Each task declares its own (``Task.builtin_models``)."""

    name: str
    default_size: int
    builder: str

    def build(self, labels: list[str], image_size: int) -> tuple[Any, Any]:
        return import_object(self.builder)(labels, image_size)


def label_maps(labels: Sequence[str]) -> dict[str, Any]:
    """A config's ``id2label`` and ``label2id`` for ``labels``."""
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}


def is_builtin(ref: str) -> bool:
    """Built-in models are called ``tiny`` or ``tiny-<variant>`` (and no such local folder exists)."""
    return (ref == "tiny" or ref.startswith("tiny-")) and not Path(ref).exists()


PRETRAINED_SUFFIX = "-pretrained"
PRETRAINED_DIR = Path(__file__).parents[1] / "pretrained"


def twin_folder(task: str, name: str) -> Path:
    """Where the pretrained twin of the built-in ``name`` of ``task`` is shipped."""
    return PRETRAINED_DIR / f"{task}-{name}"


def known_builtins(task: str, models: Sequence[BuiltinModel]) -> list[str]:
    """Every name that ``--model`` accepts as a built-in of ``task``, twins included."""
    names = [model.name for model in models]
    return names + [name + PRETRAINED_SUFFIX for name in names if (twin_folder(task, name) / "config.json").exists()]


def pretrained_folder(task: str, models: Sequence[BuiltinModel], name: str) -> Path | None:
    """The checkpoint folder of the pretrained twin ``name`` (``<built-in>-pretrained``) among
    ``task``'s ``models``, or None when ``name`` is not a twin; a twin that is missing is an error."""
    if not name.endswith(PRETRAINED_SUFFIX):
        return None
    twin = name[: -len(PRETRAINED_SUFFIX)]
    folder = twin_folder(task, twin)
    if twin not in {model.name for model in models} or not (folder / "config.json").exists():
        raise _unknown(task, models, name)
    return folder


def build_builtin(task: str, models: Sequence[BuiltinModel], name: str, labels: list[str], image_size: int | None):
    """(model, processor) of the built-in ``name`` among ``task``'s ``models``, or a clear error listing them."""
    model = next((model for model in models if model.name == name), None)
    if model is None:
        raise _unknown(task, models, name)
    return model.build(list(labels), image_size or model.default_size)


def _unknown(task: str, models: Sequence[BuiltinModel], name: str) -> VisionLoraError:
    known = ", ".join(known_builtins(task, models))
    return VisionLoraError(f"--model {name}: no such built-in {task} model (built-in: {known})")
