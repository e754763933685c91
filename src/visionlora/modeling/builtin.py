"""Built-in small models, for trying things offline and for tests: ``--model tiny`` and friends.

``tiny`` and ``tiny-rtdetr`` are built from a config with random weights and their matching
image processor. Each has a ``-pretrained`` twin: the same architecture after visionlora's
own full training on a procedural corpus (``scripts/pretrain_builtins.py``), shipped as a
small checkpoint folder under ``visionlora/pretrained/`` and loaded like any checkpoint.
They are fixtures, not task logic: a task asks this registry for ``(task, name)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionlora.errors import VisionLoraError
from visionlora.lazy import import_object


@dataclass(frozen=True)
class BuiltinModel:
    """A named small model of one task: ``builder`` ("module:function") builds
    ``(model, processor)`` from ``(labels, image_size)``; its module is imported when asked for."""

    task: str
    name: str
    default_size: int
    builder: str

    def build(self, labels: list[str], image_size: int) -> tuple[Any, Any]:
        return import_object(self.builder)(labels, image_size)


def label_maps(labels: list[str]) -> dict[str, Any]:
    """A config's ``id2label`` and ``label2id`` for ``labels``."""
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}


def is_builtin(ref: str) -> bool:
    """Built-in models are called ``tiny`` or ``tiny-<variant>`` (and no such local folder exists)."""
    return (ref == "tiny" or ref.startswith("tiny-")) and not Path(ref).exists()


PRETRAINED_SUFFIX = "-pretrained"
PRETRAINED_DIR = Path(__file__).parents[1] / "pretrained"


def pretrained_folder(task: str, name: str) -> Path | None:
    """The checkpoint folder of the pretrained twin ``name`` (``<built-in>-pretrained``) of
    ``task``, or None when ``name`` is not a twin; a twin that is missing is an error."""
    if not name.endswith(PRETRAINED_SUFFIX):
        return None
    twin = name[: -len(PRETRAINED_SUFFIX)]
    folder = PRETRAINED_DIR / f"{task}-{twin}"
    if (task, twin) not in BUILTIN or not (folder / "config.json").exists():
        known = ", ".join(n for t, n in known_builtins() if t == task)
        raise VisionLoraError(f"--model {name}: no such built-in {task} model (built-in: {known})")
    return folder


def known_builtins() -> list[tuple[str, str]]:
    """Every (task, name) that ``--model`` accepts as a built-in, twins included."""
    twins = [(task, name + PRETRAINED_SUFFIX) for task, name in BUILTIN
             if (PRETRAINED_DIR / f"{task}-{name}" / "config.json").exists()]
    return list(BUILTIN) + twins


def build_builtin(task: str, name: str, labels: list[str], image_size: int | None):
    """(model, processor) of the built-in ``name`` for ``task``, or a clear error listing them."""
    model = BUILTIN.get((task, name))
    if model is None:
        known = ", ".join(n for t, n in known_builtins() if t == task)
        raise VisionLoraError(f"--model {name}: no such built-in {task} model (built-in: {known})")
    return model.build(list(labels), image_size or model.default_size)


BUILTIN: dict[tuple[str, str], BuiltinModel] = {
    (m.task, m.name): m
    for m in (
        BuiltinModel("classification", "tiny", 32, "visionlora.tasks.classification.builtin:tiny_vit"),
        BuiltinModel("detection", "tiny", 64, "visionlora.tasks.detection.builtin:tiny_detr"),
        BuiltinModel("detection", "tiny-rtdetr", 64, "visionlora.tasks.detection.builtin:tiny_rtdetr"),
        BuiltinModel("pose", "tiny", 64, "visionlora.tasks.pose.builtin:tiny_vitpose"),
        BuiltinModel("segmentation", "tiny", 64, "visionlora.tasks.segmentation.builtin:tiny_segformer"),
    )
}
