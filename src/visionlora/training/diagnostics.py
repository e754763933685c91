"""What a user looks at after training, from the best weights on the validation data:
``per_class.csv``, the task's plots and a grid of images with truth and prediction drawn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image, ImageDraw

from visionlora.artifacts import RunPaths, atomic_write_bytes, rows_csv
from visionlora.core.outputs import png_bytes
from visionlora.data.images import UnreadableImage, load_rgb
from visionlora.data.records import image_source
from visionlora.deploy.prediction import predict
from visionlora.tasks.base import Evaluation, ModelInfo, Task

GRID_IMAGES = 16
TILE = 256  # pixels of the longer side of each drawn image


def write_diagnostics(task: Task, model: Any, processor: Any, dataset: Any, records: Sequence[Any], info: ModelInfo,
                      paths: RunPaths, evaluation: Evaluation) -> list[str]:
    """Write per_class.csv, the task's plots (from ``evaluation``, the final pass over
    ``dataset``) and predictions.png; return the file names written."""
    found = task.report.diagnostics(dataset, evaluation.indices, evaluation.outputs, info)
    written = []
    if found.per_class:
        atomic_write_bytes(paths.per_class, rows_csv(found.per_class).encode())
        written.append(paths.per_class.name)
    for name, png in found.figures.items():
        atomic_write_bytes(paths.results_dir / name, png)
        written.append(name)
    known = task.report.evaluated_predictions(dataset, evaluation.indices, evaluation.outputs, info)
    grid = prediction_grid(task, model, processor, records[:GRID_IMAGES], info, known)
    if grid is not None:
        atomic_write_bytes(paths.predictions_grid, png_bytes(grid))
        written.append(paths.predictions_grid.name)
    return written


@dataclass
class Shown:
    """A record in the grid: its position among the records, its image, its truth and the
    predict options that ask about the same instances."""

    position: int
    image: Image.Image
    truth: dict[str, Any]
    options: dict[str, Any]


def prediction_grid(task: Task, model: Any, processor: Any, records: Sequence[Any], info: ModelInfo,
                    known: dict[int, dict[str, Any]] | None = None) -> Image.Image | None:
    """Pairs of tiles, truth then prediction, four pairs to a row; None without readable images.

    ``known`` holds predictions already made, by each record's position (see
    ``TaskReport.evaluated_predictions``); the other records are predicted here.
    """
    shown = []
    for position, record in enumerate(records):
        try:
            image = load_rgb(image_source(record))
        except UnreadableImage:
            continue
        shown.append(Shown(position, image, *task.report.ground_truth(record, image, info)))
    if not shown:
        return None
    predictions = _predictions(task, model, processor, shown, info, known or {})
    tiles = [(_tile(task.prediction.draw(item.image, item.truth, info), f"truth {task.report.caption(item.truth)}"),
              _tile(task.prediction.draw(item.image, prediction, info),
                    f"prediction {task.report.caption(prediction)}"))
             for item, prediction in zip(shown, predictions)]
    columns = min(4, len(tiles))
    rows = -(-len(tiles) // columns)
    width = max(a.width + b.width for a, b in tiles)
    height = max(max(a.height, b.height) for a, b in tiles)
    grid = Image.new("RGB", (columns * (width + 8), rows * (height + 8)), (255, 255, 255))
    for index, (truth_tile, prediction_tile) in enumerate(tiles):
        x, y = (index % columns) * (width + 8), (index // columns) * (height + 8)
        grid.paste(truth_tile, (x, y))
        grid.paste(prediction_tile, (x + truth_tile.width, y))
    return grid


def _predictions(task: Task, model: Any, processor: Any, shown: list[Shown], info: ModelInfo,
                 known: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each shown record's prediction: the known one, else predicted now, in one batch for the
    records that need no options of their own (one call each for the others)."""
    made = dict(known)
    plain = [item for item in shown if item.position not in made and not item.options]
    if plain:
        made.update(zip([item.position for item in plain],
                        predict(task, model, processor, [item.image for item in plain], info)))
    for item in shown:
        if item.position not in made:
            made[item.position] = predict(task, model, processor, [item.image], info, **item.options)[0]
    return [made[item.position] for item in shown]


def _tile(image: Image.Image, caption: str) -> Image.Image:
    """``image`` scaled to TILE pixels on its longer side, captioned at the bottom."""
    scale = TILE / max(image.size)
    tile = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    draw = ImageDraw.Draw(tile)
    left, top, right, bottom = draw.textbbox((0, 0), caption)
    draw.rectangle((0, tile.height - (bottom - top) - 6, right + 6, tile.height), fill=(0, 0, 0))
    draw.text((3, tile.height - (bottom - top) - 4), caption, fill=(255, 255, 255))
    return tile
