"""Glue between RGB images, an image processor, and cached uint8 pixels.

Images are decoded once and kept as uint8 arrays. Training and evaluation batches carry
them as uint8 through the data loader (a quarter of float32's bytes between processes and
to the device) and are normalised where the model is, one batch at a time. Prediction
normalises each image itself. Both use the processor's own mean, std and rescale factor
through the same two steps: :func:`processor_pixels`, then :class:`Normalizer`.
"""

from __future__ import annotations

import math
import random
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

cv2.setNumThreads(0)  # OpenCV runs on the calling thread; its own pool would compete with torch's

# Training images are cached a little larger than the model input, as in the classic
# resize-256 / crop-224 recipe, so random crops keep detail.
TRAIN_CACHE_SCALE = 256 / 224


def processor_output_size(processor: Any) -> tuple[int, int]:
    """(height, width) of the pixel_values the processor produces."""
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        crop = processor.crop_size
        return int(crop["height"]), int(crop["width"])
    size = processor.size
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    edge = size.get("shortest_edge") or size.get("longest_edge")
    return int(edge), int(edge)


def processor_size(processor: Any) -> dict[str, int]:
    """The processor's resize rule as a plain dict (fixed size, or shortest/longest edge)."""
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        height, width = processor_output_size(processor)
        return {"height": height, "width": width}
    size = processor.size
    keys = ("height", "width", "shortest_edge", "longest_edge")
    return {key: int(size.get(key)) for key in keys if size.get(key)}


def set_processor_size(processor: Any, image_size: int) -> None:
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


def processor_pixels(processor: Any, image: Image.Image) -> torch.Tensor:
    """The processor's resize and crop, without rescale or normalisation: uint8 (3, H, W)."""
    out = processor(image, do_rescale=False, do_normalize=False)["pixel_values"][0]
    return torch.from_numpy(np.ascontiguousarray(np.asarray(out).round().clip(0, 255).astype(np.uint8)))


class Normalizer:
    """The processor's rescale and normalise steps, applied to uint8 tensors in torch."""

    def __init__(self, processor: Any) -> None:
        scale = processor.rescale_factor if getattr(processor, "do_rescale", True) else 1.0
        normalize = getattr(processor, "do_normalize", True)
        mean = processor.image_mean if normalize else [0.0, 0.0, 0.0]
        std = processor.image_std if normalize else [1.0, 1.0, 1.0]
        std_ = torch.tensor(std, dtype=torch.float32)
        # (x * scale - mean) / std as x * (scale / std) + (-mean / std), in place on the float copy
        self.multiplier = (float(scale) / std_).view(-1, 1, 1)
        self.offset = (-torch.tensor(mean, dtype=torch.float32) / std_).view(-1, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) or (N, 3, H, W) -> normalised float32 of that shape, on the pixels' device.

        Per element this is the same two float32 operations for one image or a batch, on any
        device, so a batch normalised on the device equals its images normalised one by one.
        """
        multiplier, offset = self._constants(pixels.device)
        return pixels.float().mul_(multiplier).add_(offset)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self.multiplier.to(device), self.offset.to(device))
        return self._on_device[device]


def tensor_view(array: np.ndarray) -> torch.Tensor:
    """The array as a tensor without copying (a batch's stack copies once), unless it is read-only
    or flipped by negative strides."""
    if not array.flags.writeable or min(array.strides) < 0:
        array = np.array(array)
    return torch.from_numpy(array)


def chw(image: np.ndarray) -> torch.Tensor:
    """A uint8 (H, W, 3) array as a (3, H, W) tensor view."""
    return tensor_view(image).permute(2, 0, 1)


def resize_for_training(image: Image.Image, output_size: tuple[int, int]) -> np.ndarray:
    """Shrink so the shorter side is about 1.14x the model input (never enlarge): uint8 HWC."""
    target = math.ceil(max(output_size) * TRAIN_CACHE_SCALE)
    width, height = image.size
    shorter = min(width, height)
    if shorter > target:
        factor = target / shorter
        image = image.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


class RandomResizedCropFlip:
    """torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip.

    Written out (with OpenCV's resize) rather than composed from albumentations because it
    runs for every training image every epoch: this costs about a quarter of a composed
    pipeline, and the randomness comes only from the generator it is given.
    """

    def __init__(self, output_size: tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.height, self.width = output_size
        self.scale, self.log_ratio = scale, (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, image: np.ndarray, rng: random.Random) -> np.ndarray:
        top, left, height, width = self._box(image.shape[0], image.shape[1], rng)
        crop = cv2.resize(image[top : top + height, left : left + width], (self.width, self.height),
                          interpolation=cv2.INTER_LINEAR)
        return cv2.flip(crop, 1) if rng.random() < 0.5 else crop

    def _box(self, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        ratio = width / height  # fall back to a central crop at the allowed aspect
        if ratio < math.exp(self.log_ratio[0]):
            w, h = width, round(width / math.exp(self.log_ratio[0]))
        elif ratio > math.exp(self.log_ratio[1]):
            h, w = height, round(height * math.exp(self.log_ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w
