"""The built-in detection models (``--model tiny``, ``tiny-rtdetr``), registered in
:mod:`visionlora.modeling.builtin`."""

from __future__ import annotations

from typing import Any

from visionlora.modeling.builtin import label_maps


def tiny_detr(labels: list[str], shortest_edge: int):
    """A DETR with a 4-stage, 16-128 channel ResNet, one 64-wide encoder/decoder layer, 5 queries."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessorPil, ResNetConfig

    # transformers configs take these through **kwargs, which their typed signatures leave out
    stages: dict[str, Any] = {"out_features": ["stage4"]}
    backbone = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic", **stages
    )
    head: dict[str, Any] = {"num_labels": len(labels), **label_maps(labels), "use_timm_backbone": False,
                            "use_pretrained_backbone": False}
    config = DetrConfig(
        backbone_config=backbone, **head,
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

    stages: dict[str, Any] = {"out_indices": [2, 3, 4]}
    backbone = RTDetrResNetConfig(
        layer_type="basic", embedding_size=16, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
        downsample_in_bottleneck=False, **stages,
    )
    head: dict[str, Any] = {"num_labels": len(labels), **label_maps(labels)}
    config = RTDetrV2Config(
        backbone_config=backbone, **head,
        tie_word_embeddings=False, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=64, encoder_ffn_dim=128,
        encoder_attention_heads=4, d_model=64, decoder_in_channels=[64, 64, 64], decoder_ffn_dim=128,
        decoder_attention_heads=4, decoder_layers=2, num_queries=20, num_denoising=10, anchor_image_size=[size, size],
    )
    processor = RTDetrImageProcessorPil(size={"height": size, "width": size})
    return RTDetrV2ForObjectDetection(config), processor
