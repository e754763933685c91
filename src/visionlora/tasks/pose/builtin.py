"""The built-in pose models (``--model tiny``), registered in :mod:`visionlora.modeling.builtin`."""

from __future__ import annotations

from typing import Any

from visionlora.errors import VisionLoraError


def tiny_vitpose(labels: list[str], height: int):
    """A 2-layer, 64-wide ViTPose with 8-pixel patches, input height x 3/4 height."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessorPil

    width = round(height * 3 / 4 / 8) * 8
    if height % 8 or width < 8:
        raise VisionLoraError(f"--image-size {height}: the tiny ViTPose needs a multiple of 8 (16 or more)")
    # transformers configs take these through **kwargs, which their typed signatures leave out
    layers: dict[str, Any] = {"intermediate_size": 128, "out_indices": [2]}
    backbone = VitPoseBackboneConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=[height, width], patch_size=[8, 8],
        **layers,
    )
    processor = VitPoseImageProcessorPil(size={"height": height, "width": width})
    head: dict[str, Any] = {"num_labels": len(labels)}
    return VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, **head)), processor
