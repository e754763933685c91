"""Built-in small models, for trying things offline and for tests: ``--model tiny`` and friends.

``tiny`` and ``tiny-rtdetr`` are built from a config with random weights and their matching
image processor. Each has a ``-pretrained`` twin: the same architecture after visionlora's
own full training on a procedural corpus (``scripts/pretrain_builtins.py``), shipped as a
small checkpoint folder under ``visionlora/pretrained/`` and loaded like any checkpoint.
They are fixtures, not task logic: a task asks this registry for ``(task, name)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from visionlora.errors import VisionLoraError


@dataclass(frozen=True)
class BuiltinModel:
    """A named small model of one task: ``build(labels, image_size)`` -> (model, processor)."""

    task: str
    name: str
    default_size: int
    build: Callable[[list[str], int], tuple[Any, Any]]


def is_builtin(ref: str) -> bool:
    """Built-in models are called ``tiny`` or ``tiny-<variant>`` (and no such local folder exists)."""
    return (ref == "tiny" or ref.startswith("tiny-")) and not Path(ref).exists()


PRETRAINED_SUFFIX = "-pretrained"
PRETRAINED_DIR = Path(__file__).parents[1] / "pretrained"


def pretrained_folder(task: str, name: str) -> Path | None:
    """The checkpoint folder of the pretrained twin ``name`` (``<built-in>-pretrained``) of
    ``task``, or None when ``name`` is not a twin; a twin that is missing is an error."""
    if not name.endswith(PRETRAINED_SUFFIX):
        return None
    twin = name[: -len(PRETRAINED_SUFFIX)]
    folder = PRETRAINED_DIR / f"{task}-{twin}"
    if (task, twin) not in BUILTIN or not (folder / "config.json").exists():
        known = ", ".join(n for t, n in known_builtins() if t == task)
        raise VisionLoraError(f"--model {name}: no such built-in {task} model (built-in: {known})")
    return folder


def known_builtins() -> list[tuple[str, str]]:
    """Every (task, name) that ``--model`` accepts as a built-in, twins included."""
    twins = [(task, name + PRETRAINED_SUFFIX) for task, name in BUILTIN
             if (PRETRAINED_DIR / f"{task}-{name}" / "config.json").exists()]
    return list(BUILTIN) + twins


def build_builtin(task: str, name: str, labels: list[str], image_size: int | None):
    """(model, processor) of the built-in ``name`` for ``task``, or a clear error listing them."""
    model = BUILTIN.get((task, name))
    if model is None:
        known = ", ".join(n for t, n in known_builtins() if t == task)
        raise VisionLoraError(f"--model {name}: no such built-in {task} model (built-in: {known})")
    return model.build(list(labels), image_size or model.default_size)


def _label_maps(labels: list[str]) -> dict[str, Any]:
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}


def tiny_vit(labels: list[str], image_size: int):
    """A 2-layer, 64-wide ViT on an 8x8 patch grid: seconds to train on a CPU."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    if image_size % 8:
        raise VisionLoraError(f"--image-size {image_size}: the tiny ViT needs a multiple of 8")
    config = ViTConfig(
        num_labels=len(labels), **_label_maps(labels), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, image_size=image_size, patch_size=image_size // 8,  # an 8x8 grid at any size
    )
    processor = ViTImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return ViTForImageClassification(config), processor


def tiny_detr(labels: list[str], shortest_edge: int):
    """A DETR with a 4-stage, 16-128 channel ResNet, one 64-wide encoder/decoder layer, 5 queries."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessorPil, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage4"]
    )
    config = DetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
        num_labels=len(labels), **_label_maps(labels),
        d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=5, dropout=0.0,
    )
    processor = DetrImageProcessorPil(size={"shortest_edge": shortest_edge,
                                            "longest_edge": round(shortest_edge * 1333 / 800)})
    model = DetrForObjectDetection(config)
    # DETR freezes its backbone, expecting pretrained features; a random one must learn.
    for param in model.parameters():
        param.requires_grad_(True)
    return model, processor


def tiny_rtdetr(labels: list[str], size: int):
    """An RT-DETRv2 with a 16-128 channel ResNet, a 64-wide encoder and 2 decoder layers, 20 queries."""
    from transformers import RTDetrImageProcessorPil, RTDetrResNetConfig, RTDetrV2Config, RTDetrV2ForObjectDetection

    backbone = RTDetrResNetConfig(
        layer_type="basic", embedding_size=16, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
        downsample_in_bottleneck=False, out_indices=[2, 3, 4],
    )
    config = RTDetrV2Config(
        backbone_config=backbone, num_labels=len(labels), **_label_maps(labels),
        tie_word_embeddings=False, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=64, encoder_ffn_dim=128,
        encoder_attention_heads=4, d_model=64, decoder_in_channels=[64, 64, 64], decoder_ffn_dim=128,
        decoder_attention_heads=4, decoder_layers=2, num_queries=20, num_denoising=10, anchor_image_size=[size, size],
    )
    processor = RTDetrImageProcessorPil(size={"height": size, "width": size})
    return RTDetrV2ForObjectDetection(config), processor


def tiny_vitpose(labels: list[str], height: int):
    """A 2-layer, 64-wide ViTPose with 8-pixel patches, input height x 3/4 height."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessorPil

    width = round(height * 3 / 4 / 8) * 8
    if height % 8 or width < 8:
        raise VisionLoraError(f"--image-size {height}: the tiny ViTPose needs a multiple of 8 (16 or more)")
    backbone = VitPoseBackboneConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=[height, width], patch_size=[8, 8], out_indices=[2],
    )
    processor = VitPoseImageProcessorPil(size={"height": height, "width": width})
    return VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=len(labels))), processor


BUILTIN: dict[tuple[str, str], BuiltinModel] = {
    (m.task, m.name): m
    for m in (
        BuiltinModel("classification", "tiny", 32, tiny_vit),
        BuiltinModel("detection", "tiny", 64, tiny_detr),
        BuiltinModel("detection", "tiny-rtdetr", 64, tiny_rtdetr),
        BuiltinModel("pose", "tiny", 64, tiny_vitpose),
    )
}
