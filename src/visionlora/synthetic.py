"""Deterministic generated image sets with known labels, for the demo and the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASS_COLOURS = {
    "red_disc": (220, 40, 40),
    "green_disc": (40, 190, 60),
    "blue_disc": (50, 80, 230),
    "yellow_disc": (235, 215, 40),
}


def classification_image(label: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A noisy grey background with one disc whose colour gives the class."""
    background = rng.integers(60, 180, size=(size, size, 1)).repeat(3, axis=2)
    noise = rng.integers(-25, 25, size=(size, size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    radius = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(radius, size - radius, size=2))
    colour = tuple(int(np.clip(c + rng.integers(-20, 20), 0, 255)) for c in CLASS_COLOURS[label])
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    return image


def make_classification_folder(
    root: Path, per_class_train: int = 30, per_class_val: int = 10, classes: list[str] | None = None, seed: int = 0
) -> Path:
    """Write ``root/train/<class>/*.png`` and ``root/val/<class>/*.png``; return ``root``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for label in classes or list(CLASS_COLOURS):
            folder = Path(root) / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                classification_image(label, rng).save(folder / f"{label}_{index:03d}.png")
    return Path(root)
