"""The default detector's checkpoint layout (a timm ResNet backbone), trained without timm."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import hub_snapshot
from visionlora.examples.synthetic import make_detection_dataset
from visionlora.tasks import get_task

pytestmark = pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="checks the path without timm")
HF_TO_TIMM = [  # transformers ResNet names -> timm names, for writing a checkpoint in the hub's layout
    (r"embedder\.embedder\.convolution\.weight", lambda m: "conv1.weight"),
    (r"embedder\.embedder\.normalization\.(\w+)", lambda m: f"bn1.{m[1]}"),
    (r"encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.convolution\.weight",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.weight"),
    (r"encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.normalization\.(\w+)",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.{m[4]}"),
    (r"encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.convolution\.weight",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0.weight"),
    (r"encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.normalization\.(\w+)",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1.{m[3]}"),
]


def _timm_name(name: str) -> str:
    for pattern, rename in HF_TO_TIMM:
        match = re.fullmatch(pattern, name)
        if match:
            return rename(match)
    raise AssertionError(name)


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory):
    """A DETR with a ResNet-18 backbone saved as the hub keeps facebook/detr-resnet-50: transformers-4
    config with use_timm_backbone, backbone tensors under timm names in backbone.conv_encoder.model."""
    from safetensors.torch import save_file
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessorPil, ResNetConfig

    root = tmp_path_factory.mktemp("detr-hub")
    small = dict(num_labels=2, d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32,
                 num_queries=5, encoder_attention_heads=2, decoder_attention_heads=2)
    backbone = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                            embedding_size=64, out_features=["stage4"])
    torch.manual_seed(0)
    original = DetrForObjectDetection(DetrConfig(backbone_config=backbone, use_timm_backbone=False,
                                                 use_pretrained_backbone=False, **small)).eval()
    with torch.no_grad():  # running statistics that matter
        for name, buffer in original.named_buffers():
            if "running_mean" in name:
                buffer.normal_(0, 0.1)
            elif "running_var" in name:
                buffer.uniform_(0.5, 2.0)
    timm_state = {}
    for key, tensor in original.state_dict().items():
        if key.startswith("model.backbone.model."):
            timm_key = "model.backbone.conv_encoder.model." + _timm_name(key[len("model.backbone.model."):])
            timm_state[timm_key] = tensor.contiguous()
        else:
            timm_state[key] = tensor.contiguous()
    folder = root / "checkpoint"
    folder.mkdir()
    config = DetrConfig(backbone_config=backbone, use_timm_backbone=False, **small).to_dict()
    config.update(use_timm_backbone=True, backbone="resnet18", backbone_config=None, use_pretrained_backbone=False)
    (folder / "config.json").write_text(json.dumps(config))  # the transformers-4 layout of the hub's config
    save_file(timm_state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    DetrImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 107}).save_pretrained(folder)
    return {"folder": folder, "original": original, "timm_state": timm_state, "root": root}


def _reference_resnet18(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """ResNet-18 (v1.5, frozen BatchNorm) in plain torch, from timm-named tensors."""
    def bn(x, prefix):
        return F.batch_norm(x, tensors[f"{prefix}.running_mean"], tensors[f"{prefix}.running_var"],
                            tensors[f"{prefix}.weight"], tensors[f"{prefix}.bias"], False, 0.0, 1e-5)

    x = F.max_pool2d(F.relu(bn(F.conv2d(x, tensors["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    for layer in range(1, 5):
        for block in range(2):
            stride = 2 if layer > 1 and block == 0 else 1
            name = f"layer{layer}.{block}"
            out = F.relu(bn(F.conv2d(x, tensors[f"{name}.conv1.weight"], stride=stride, padding=1), f"{name}.bn1"))
            out = bn(F.conv2d(out, tensors[f"{name}.conv2.weight"], padding=1), f"{name}.bn2")
            identity = x
            if f"{name}.downsample.0.weight" in tensors:
                identity = bn(F.conv2d(x, tensors[f"{name}.downsample.0.weight"], stride=stride),
                              f"{name}.downsample.1")
            x = F.relu(out + identity)
    return x


def test_the_timm_checkpoint_loads_with_every_backbone_weight_and_the_same_features(hub_layout, tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONLORA_CACHE", str(tmp_path / "cache"))
    model, _, info = get_task("detection").model.build_model(str(hub_layout["folder"]), ["red_box", "blue_box"], None,
                                                             "full")
    state = model.state_dict()
    backbone = {k: v for k, v in state.items() if k.startswith("model.backbone.model.")}
    originals = hub_layout["original"].state_dict()
    assert len(backbone) == len([k for k in hub_layout["timm_state"] if ".conv_encoder." in k]) > 50
    for key, tensor in backbone.items():
        assert torch.equal(tensor, originals[key]), key
    pixels = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        features = model.eval().model.backbone(pixels, torch.ones(2, 64, 80, dtype=torch.long))[0][0]
        tensors = {k[len("model.backbone.conv_encoder.model."):]: v for k, v in hub_layout["timm_state"].items()
                   if ".conv_encoder." in k}
        expected = _reference_resnet18(pixels, tensors)
    assert torch.allclose(features, expected, atol=1e-4)
    # full mode trains what timm's DETR trains: layer2-4 (stages 1-3); the stem and layer1 stay frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".backbone." in n}
    assert trainable and all(re.search(r"encoder\.stages\.[123]\.", n) for n in trainable)
    stages = {n for n, _ in model.named_parameters() if re.search(r"backbone\.model\.encoder\.stages\.[123]\.", n)}
    assert trainable == stages


def test_the_default_detector_trains_offline_without_timm(hub_layout, tmp_path):
    """Through the hub id, offline: train in both modes, then predict, in one fresh process."""
    home = tmp_path / "hf_home"
    shutil.copytree(hub_layout["folder"], hub_snapshot(home, "facebook/detr-resnet-50", "1" * 40))
    data = make_detection_dataset(tmp_path / "boxes", "coco", n_train=6, n_val=2)
    image = next((data / "val" / "images").glob("*.png"))
    commands = [["train", "--task", "detection", "--data", str(data), "--epochs", "1", "--mode", mode, "--no-progress",
                 "--output", str(tmp_path / mode)] for mode in ("full", "lora")]
    commands.append(["predict", str(tmp_path / "lora"), str(image), "--threshold", "0",
                     "--output", str(tmp_path / "boxes.json")])
    script = ("import json, sys\nfrom visionlora.cli import main\n"
              "for argv in json.loads(sys.argv[1]):\n    print('exit code', main(argv), flush=True)\n")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "VISIONLORA_CACHE": str(tmp_path / "cache")}
    completed = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True,
                               timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.count("exit code 0") == 3, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert completed.stdout.count("model facebook/detr-resnet-50") == 2
    summary = json.loads((tmp_path / "lora" / "training_results_lora" / "training_summary.json").read_text())
    assert summary["base_model"] == "facebook/detr-resnet-50" and summary["base_revision"] == "1" * 40
    assert json.loads((tmp_path / "boxes.json").read_text())[0]["boxes"]
