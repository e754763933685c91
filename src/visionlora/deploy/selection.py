"""What to label next (``visionlora select``): unlabelled images ranked by the model's uncertainty,
spread by k-center greedy over its own image features, so the picks are not near-copies.

One forward per batch gives both: the prediction (its task's ``uncertainty``) and the pooled
hidden states (its task's ``image_features``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from visionlora.artifacts import atomic_write_bytes
from visionlora.core.outputs import png_bytes
from visionlora.data.images import UnreadableImage, load_rgb
from visionlora.errors import VisionLoraError


@dataclass
class Scored:
    """The images read, each one's uncertainty and feature row, and the files skipped."""

    files: list[Path]
    uncertainty: np.ndarray  # (N,) in [0, 1]
    features: np.ndarray  # (N, D), unit length
    skipped: list[dict[str, str]]


@torch.inference_mode()
def score_images(run: Any, files: Sequence[Path], batch: int | None = None) -> Scored:
    """Each readable image's uncertainty and pooled features under ``run`` (a loaded run)."""
    task, options = run.task, run.task.prediction.default_options()
    kept, uncertainty, features, skipped = [], [], [], []
    step = batch or task.predict_batch
    for start in range(0, len(files), step):
        images, names = [], []
        for path in files[start:start + step]:
            try:
                images.append(load_rgb(path))
                names.append(Path(path))
            except UnreadableImage as err:
                skipped.append({"file": str(path), "reason": str(err)})
        if not images:
            continue
        unsure, rows = _forward(run, images, options)
        kept += names
        uncertainty += unsure
        features.append(rows)
    if not kept:
        raise VisionLoraError("no readable images to select from"
                              + (f" (skipped {skipped[0]['file']}: {skipped[0]['reason']})" if skipped else ""))
    rows = np.concatenate(features)
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return Scored(kept, np.asarray(uncertainty, dtype=np.float64), rows, skipped)


def _forward(run: Any, images: list[Image.Image], options: dict[str, Any]) -> tuple[list[float], np.ndarray]:
    """Each image's uncertainty (of its prediction, or its inputs' outputs averaged) and feature row
    (its inputs' rows averaged) from one forward."""
    task, model = run.task, run.model
    model.eval()
    inputs = [item for index, image in enumerate(images)
              for item in task.prediction.predict_inputs(image, index, run.processor, run.info, options)]
    batch = {k: v.to(model.device) for k, v in task.prediction.model_inputs([i.pixel_values for i in inputs]).items()}
    outputs = model(**batch, **run.info.forward_kwargs, output_hidden_states=True)
    rows = task.model.image_features(outputs).float().cpu().numpy()
    per_rows: list[list[np.ndarray]] = [[] for _ in images]
    for item, row in zip(inputs, rows):
        per_rows[item.image_index].append(row)
    features = np.stack([np.mean(r, axis=0) for r in per_rows])
    raw = task.prediction.output_uncertainty(outputs)
    if raw is not None:
        per_input: list[list[float]] = [[] for _ in images]
        for item, value in zip(inputs, raw):
            per_input[item.image_index].append(value)
        return [float(np.mean(values)) for values in per_input], features
    results = task.prediction.decode(outputs, inputs, images, run.processor, run.info, options)
    per_image: list[list[Any]] = [[] for _ in images]
    for item, result in zip(inputs, results):
        per_image[item.image_index].append(result)
    return [task.prediction.uncertainty(task.prediction.combine(r)) for r in per_image], features


def pick(uncertainty: np.ndarray, features: np.ndarray, count: int) -> list[int]:
    """``count`` indices, k-center greedy weighted by uncertainty: first the least sure image, then
    each time the one whose uncertainty times its distance to the nearest pick is largest, so a
    near-copy of a pick (distance ~0) comes last whatever its uncertainty."""
    nearest = np.full(len(uncertainty), np.inf)
    weight = np.clip(uncertainty, 1e-6, None)  # an image the model is sure of still spreads the picks
    chosen: list[int] = []
    for _ in range(count):
        gain = np.where(np.isinf(nearest), weight, weight * nearest)
        gain[chosen] = -1.0
        best = int(np.argmax(gain))
        chosen.append(best)
        nearest = np.minimum(nearest, np.linalg.norm(features - features[best], axis=1))
    return chosen


def contact_sheet(files: Sequence[Path], scores: Sequence[float], columns: int = 6, cell: int = 160) -> Image.Image:
    """The chosen images as a grid, each captioned with its rank and uncertainty."""
    from PIL import ImageDraw, ImageOps

    columns = max(1, min(columns, len(files)))
    rows = max(1, -(-len(files) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * (cell + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for rank, (path, score) in enumerate(zip(files, scores)):
        thumb = ImageOps.contain(load_rgb(path), (cell - 8, cell - 8))
        x, y = (rank % columns) * cell, (rank // columns) * (cell + 16)
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        draw.text((x + 4, y + cell), f"{rank + 1}. {Path(path).name[:18]}  {score:.2f}", fill=(0, 0, 0))
    return sheet


def select(run: Any, files: Sequence[Path], count: int, output: Path, sheet: Path | None = None,
           where: str = "the images") -> tuple[list[Path], list[float], Scored]:
    """Pick ``count`` of ``files`` to label next; write their paths (one a line) to ``output`` and
    the contact sheet to ``sheet`` (default: ``output`` with ``.png``)."""
    if count < 1:
        raise VisionLoraError(f"--count must be at least 1, not {count}")
    if count > len(files):
        raise VisionLoraError(f"--count {count}: {where} hold only {len(files)} image(s)")
    scored = score_images(run, files)
    if count > len(scored.files):
        raise VisionLoraError(f"--count {count}: only {len(scored.files)} of {where} are readable")
    chosen = pick(scored.uncertainty, scored.features, count)
    paths = [scored.files[i] for i in chosen]
    scores = [float(scored.uncertainty[i]) for i in chosen]
    try:
        atomic_write_bytes(Path(output), "".join(f"{path}\n" for path in paths).encode())
        atomic_write_bytes(Path(sheet or Path(output).with_suffix(".png")), png_bytes(contact_sheet(paths, scores)))
    except OSError as err:
        raise VisionLoraError(f"{output}: cannot write: {err.strerror or err}") from None
    return paths, scores, scored
