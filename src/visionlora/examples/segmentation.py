"""Generated semantic segmentation data: discs and squares on a textured background, with
masks that are exactly the shapes drawn, in the images+masks or Pascal VOC layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SEGMENTATION_CLASSES = ["background", "disc", "square"]
SHAPE_COLOURS = {1: (210, 70, 60), 2: (60, 90, 210)}  # reddish discs, bluish squares (jittered)


def segmentation_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, class-id mask) of one scene: a noisy grey background, a reddish disc and a bluish square."""
    image = (rng.integers(90, 160, 3)[None, None, :] + rng.normal(0, 12, (size, size, 3))).clip(0, 255)
    mask = np.zeros((size, size), dtype=np.uint8)
    rows, columns = np.mgrid[0:size, 0:size]
    for class_id in rng.permutation([1, 2]):
        radius = rng.uniform(0.12, 0.22) * size
        cy, cx = rng.uniform(radius, size - radius, 2)
        if class_id == 1:
            inside = (rows - cy) ** 2 + (columns - cx) ** 2 <= radius**2
        else:
            inside = (abs(rows - cy) <= radius) & (abs(columns - cx) <= radius)
        colour = np.asarray(SHAPE_COLOURS[class_id]) + rng.integers(-30, 31, 3)
        image[inside] = colour + rng.normal(0, 8, (int(inside.sum()), 3))
        mask[inside] = class_id
    return image.clip(0, 255).astype(np.uint8), mask


def palette_mask(mask: np.ndarray) -> Image.Image:
    """A palette PNG image of class ids (VOC colours)."""
    from visionlora.data.masks import palette_image, voc_palette

    return palette_image(mask, voc_palette(256))


def make_segmentation_dataset(root: Path, fmt: str = "masks", n_train: int = 16, n_val: int = 6, size: int = 48,
                              seed: int = 0) -> Path:
    """Write ``train/`` and ``val/`` images+masks folders with ``classes.txt`` (``fmt="masks"``),
    or one Pascal VOC folder with ImageSets/Segmentation train and val lists (``fmt="voc"``)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {"train": n_train, "val": n_val}
    for split, count in splits.items():
        images, masks = ((root / "JPEGImages", root / "SegmentationClass") if fmt == "voc"
                         else (root / split / "images", root / split / "masks"))
        for i in range(count):
            image, mask = segmentation_scene(rng, size)
            _save(Image.fromarray(image), images / f"{split}_{i:03d}.png")
            _save(palette_mask(mask), masks / f"{split}_{i:03d}.png")
    if fmt == "voc":
        lists = root / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True, exist_ok=True)
        for split, count in splits.items():
            (lists / f"{split}.txt").write_text("".join(f"{split}_{i:03d}\n" for i in range(count)))
    (root / "classes.txt").write_text("\n".join(SEGMENTATION_CLASSES) + "\n")
    return root


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
