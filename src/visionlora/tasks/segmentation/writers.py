"""Segmentation's own output: each predicted mask as a palette PNG (``--save-masks``)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from visionlora.artifacts import atomic_write_bytes
from visionlora.deploy.outputs import png_name


def mask_png(mask: np.ndarray, colours: Sequence[Sequence[int]]) -> bytes:
    """An (H, W) class-id mask as palette PNG bytes: pixel values are class ids, shown in ``colours``."""
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    image.putpalette([int(v) for colour in list(colours)[:256] for v in colour])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_masks(folder: Path, predictions: Sequence[dict], images, draw) -> None:
    """``<stem>.png`` per prediction: its mask (numbered when stems repeat)."""
    used: set[str] = set()
    for prediction in predictions:
        atomic_write_bytes(Path(folder) / png_name(prediction, used), base64.b64decode(prediction["mask"]))
