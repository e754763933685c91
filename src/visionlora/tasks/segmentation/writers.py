"""Segmentation's own output: each predicted mask as a palette PNG (``--save-masks``)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Sequence

import numpy as np

from visionlora.artifacts import atomic_write_bytes
from visionlora.core.outputs import png_bytes, png_name
from visionlora.data.masks import palette_image


def mask_png(mask: np.ndarray, colours: Sequence[Sequence[int]]) -> bytes:
    """An (H, W) class-id mask as palette PNG bytes: pixel values are class ids, shown in ``colours``."""
    return png_bytes(palette_image(mask, colours))


def write_masks(folder: Path, predictions: Sequence[dict], images, draw) -> None:
    """``<stem>.png`` per prediction: its mask (numbered when stems repeat)."""
    used: set[str] = set()
    for prediction in predictions:
        atomic_write_bytes(Path(folder) / png_name(prediction, used), base64.b64decode(prediction["mask"]))
