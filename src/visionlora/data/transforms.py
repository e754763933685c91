"""Glue between RGB images, an image processor, and cached uint8 pixels.

Images are decoded once and kept as uint8 arrays; normalisation happens per batch
with the processor's own mean, std and rescale factor, so evaluation and prediction
go through the same two steps: :func:`processor_pixels`, then :class:`Normalizer`.
"""

from __future__ import annotations

import math

import albumentations as A
import numpy as np
import torch
from PIL import Image

# Training images are cached a little larger than the model input, as in the classic
# resize-256 / crop-224 recipe, so random crops keep detail.
TRAIN_CACHE_SCALE = 256 / 224


def processor_output_size(processor) -> tuple[int, int]:
    """(height, width) of the pixel_values the processor produces."""
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        crop = processor.crop_size
        return int(crop["height"]), int(crop["width"])
    size = processor.size
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    edge = size.get("shortest_edge") or size.get("longest_edge")
    return int(edge), int(edge)


def processor_size(processor) -> dict[str, int]:
    """The processor's resize rule as a plain dict (fixed size, or shortest/longest edge)."""
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        height, width = processor_output_size(processor)
        return {"height": height, "width": width}
    size = processor.size
    keys = ("height", "width", "shortest_edge", "longest_edge")
    return {key: int(size.get(key)) for key in keys if size.get(key)}


def set_processor_size(processor, image_size: int) -> None:
    """Make the processor's output ``image_size`` pixels: the square side, or the shortest edge."""
    size = processor.size
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        processor.crop_size = {"height": image_size, "width": image_size}
        processor.size = {"shortest_edge": image_size}
    elif size.get("shortest_edge"):
        ratio = size["longest_edge"] / size["shortest_edge"] if size.get("longest_edge") else None
        processor.size = {"shortest_edge": image_size, **({"longest_edge": round(image_size * ratio)} if ratio else {})}
    else:
        processor.size = {"height": image_size, "width": image_size}


def processor_pixels(processor, image: Image.Image) -> torch.Tensor:
    """The processor's resize and crop, without rescale or normalisation: uint8 (3, H, W)."""
    out = processor(image, do_rescale=False, do_normalize=False)["pixel_values"][0]
    return torch.from_numpy(np.ascontiguousarray(np.asarray(out).round().clip(0, 255).astype(np.uint8)))


class Normalizer:
    """The processor's rescale and normalise steps, applied to uint8 tensors in torch."""

    def __init__(self, processor):
        scale = processor.rescale_factor if getattr(processor, "do_rescale", True) else 1.0
        normalize = getattr(processor, "do_normalize", True)
        mean = processor.image_mean if normalize else [0.0, 0.0, 0.0]
        std = processor.image_std if normalize else [1.0, 1.0, 1.0]
        self.scale = float(scale)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() * self.scale - self.mean) / self.std


def resize_for_training(image: Image.Image, output_size: tuple[int, int]) -> np.ndarray:
    """Shrink so the shorter side is about 1.14x the model input (never enlarge): uint8 HWC."""
    target = math.ceil(max(output_size) * TRAIN_CACHE_SCALE)
    width, height = image.size
    shorter = min(width, height)
    if shorter > target:
        factor = target / shorter
        image = image.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def classification_augmentation(output_size: tuple[int, int]) -> A.Compose:
    """Random resized crop and horizontal flip, as in the Hugging Face examples."""
    return A.Compose(
        [A.RandomResizedCrop(size=output_size, scale=(0.08, 1.0)), A.HorizontalFlip(p=0.5)],
        seed=0,
    )
