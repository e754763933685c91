"""How predictions are written: the options and writers that tasks declare.

The command line turns each :class:`Option` into a flag and each :class:`OutputWriter`
into a flag naming where to write; the server reads the same options as form fields.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from visionlora.artifacts import atomic_write_bytes
from visionlora.errors import VisionLoraError

Draw = Callable[[Image.Image, dict], Image.Image]


@dataclass(frozen=True)
class Option:
    """A predict or evaluate setting of a task, given as ``--name`` or as a form field ``name``.

    ``parse`` turns the text given into the value the task uses and raises
    :class:`VisionLoraError` with the reason when it cannot. A ``per_image`` option's
    value maps image paths (or file names) to a value each; the task receives a list
    aligned with the images.
    """

    name: str
    help: str
    parse: Callable[[str], Any]
    default: Any = None
    metavar: str = "VALUE"
    per_image: bool = False
    parse_form: Callable[[str], Any] | None = None  # a form field's text, when it differs from the flag's

    def parse_field(self, text: str) -> Any:
        """The value of a server form field (by ``parse_form``, else ``parse``)."""
        return (self.parse_form or self.parse)(text)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class OutputWriter:
    """A way to write predictions, chosen with ``--<name>`` naming a file or folder."""

    name: str
    help: str
    metavar: str
    write: Callable[[Path, Sequence[dict], Sequence[Image.Image], Draw], None]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def per_image_values(mapping: dict[str, Any], names: Sequence[str]) -> list[Any]:
    """The value for each image path in ``names``: by the whole path, else by file name (None if absent)."""
    return [mapping.get(str(name), mapping.get(Path(name).name)) for name in names]


def write_json(target: Path, predictions: Sequence[dict], images: Sequence[Image.Image], draw: Draw) -> None:
    """All predictions as one JSON list."""
    try:
        atomic_write_bytes(Path(target), (json.dumps(list(predictions), indent=2) + "\n").encode())
    except OSError as err:
        raise VisionLoraError(f"{target}: cannot write: {err.strerror or err}") from None


def write_drawn_images(folder: Path, predictions: Sequence[dict], images: Sequence[Image.Image], draw: Draw) -> None:
    """Each image with its prediction drawn, as ``<stem>.png`` (numbered when stems repeat)."""
    used: set[str] = set()
    for prediction, image in zip(predictions, images):
        atomic_write_bytes(Path(folder) / png_name(prediction, used), png_bytes(draw(image, prediction)))


def png_name(prediction: dict, used: set[str]) -> str:
    """``<stem>.png`` for the prediction's image, numbered (``<stem>-2.png``) when ``used`` has it."""
    stem = Path(prediction.get("image", "image")).stem
    target, number = f"{stem}.png", 2
    while target in used:
        target, number = f"{stem}-{number}.png", number + 1
    used.add(target)
    return target


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def parse_float_between(low: float, high: float, name: str) -> Callable[[str], float]:
    """A parser for a number in [low, high] that names the option when the value is wrong."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise VisionLoraError(f"{name} must be a number, not {text!r}") from None
        if not low <= value <= high:
            raise VisionLoraError(f"{name} must be between {low:g} and {high:g}, not {value:g}")
        return value

    return parse


JSON_OUTPUT = OutputWriter("output", "write predictions to this JSON file (default: print them)", "FILE.json",
                           write_json)
DRAWN_IMAGES = OutputWriter("save_images", "also save each image with its prediction drawn", "DIR", write_drawn_images)


def pixel_box(box: list[float]) -> dict[str, int]:
    """``[x0, y0, x1, y1]`` as the Hugging Face Inference API's box: integer pixels by name."""
    return dict(zip(("xmin", "ymin", "xmax", "ymax"), (int(round(v)) for v in box)))
