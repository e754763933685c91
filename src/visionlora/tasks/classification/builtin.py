"""The built-in classification models (``--model tiny``), registered in :mod:`visionlora.modeling.builtin`."""

from __future__ import annotations

from typing import Any

from visionlora.errors import VisionLoraError
from visionlora.modeling.builtin import label_maps


def tiny_vit(labels: list[str], image_size: int):
    """A 2-layer, 64-wide ViT on an 8x8 patch grid: seconds to train on a CPU."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    if image_size % 8:
        raise VisionLoraError(f"--image-size {image_size}: the tiny ViT needs a multiple of 8")
    # transformers configs take these through **kwargs, which their typed signatures leave out
    head: dict[str, Any] = {"num_labels": len(labels), **label_maps(labels)}
    config = ViTConfig(
        **head, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, image_size=image_size, patch_size=image_size // 8,  # an 8x8 grid at any size
    )
    processor = ViTImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return ViTForImageClassification(config), processor
