"""The built-in segmentation model (``--model tiny``), registered in :mod:`visionlora.modeling.builtin`."""

from __future__ import annotations

from typing import Any

from visionlora.errors import VisionLoraError
from visionlora.modeling.builtin import label_maps


def tiny_segformer(labels: list[str], image_size: int):
    """A 2-stage, 16-32 channel SegFormer with a 32-wide decode head: seconds to train on a CPU."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessorPil

    if image_size % 8:
        raise VisionLoraError(f"--image-size {image_size}: the tiny SegFormer needs a multiple of 8")
    # transformers configs take these through **kwargs, which their typed signatures leave out
    head: dict[str, Any] = {"num_labels": len(labels), **label_maps(labels)}
    config = SegformerConfig(
        **head, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
        hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
        decoder_hidden_size=32, semantic_loss_ignore_index=255,
    )
    processor = SegformerImageProcessorPil(size={"height": image_size, "width": image_size})
    return SegformerForSemanticSegmentation(config), processor
