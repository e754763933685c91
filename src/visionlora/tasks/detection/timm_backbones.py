"""DETR checkpoints whose backbone is a timm ResNet, loaded without timm.

The original ``facebook/detr-resnet-50`` keeps its backbone as a timm ResNet (config
``use_timm_backbone: true``). transformers has the same network, ResNet v1.5 with DETR's
frozen BatchNorm, so when timm cannot be imported the checkpoint is rewritten once into a
cached folder whose config names transformers' ResNet and whose backbone tensors carry its
names; every backbone tensor must find its place (shapes checked by the loader), none may be
left over or newly initialised.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from visionlora.artifacts import atomic_dir
from visionlora.errors import VisionLoraError

# timm ResNet name -> (block type, blocks per stage)
RESNETS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
           "resnet50": ("bottleneck", [3, 4, 6, 3]), "resnet101": ("bottleneck", [3, 4, 23, 3])}
WIDTHS = {"basic": [64, 128, 256, 512], "bottleneck": [256, 512, 1024, 2048]}
CONVERTED_MARK = "visionlora_timm_backbone"  # config key of a converted checkpoint: the timm model it was
FORMAT_VERSION = 2
BACKBONE = re.compile(r"^(.*backbone\.(?:conv_encoder\.)?model\.)(.+)$")
STATS = r"(weight|bias|running_mean|running_var)"
RULES = [  # timm tensor name -> transformers ResNetBackbone tensor name
    (re.compile(r"^conv1\.weight$"), lambda m: "embedder.embedder.convolution.weight"),
    (re.compile(rf"^bn1\.{STATS}$"), lambda m: f"embedder.embedder.normalization.{m[1]}"),
    (re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$"),
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.convolution.weight"),
    (re.compile(rf"^layer(\d)\.(\d+)\.bn(\d)\.{STATS}$"),
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.normalization.{m[4]}"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\.weight$"),
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.convolution.weight"),
    (re.compile(rf"^layer(\d)\.(\d+)\.downsample\.1\.{STATS}$"),
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.normalization.{m[3]}"),
]


def timm_backbone_name(config) -> str | None:
    """The timm model a config's backbone is (transformers 5 reads the hub's ``use_timm_backbone``
    and ``backbone`` keys into a ``timm_backbone`` sub-config), or None."""
    backbone = getattr(config, "backbone_config", None)
    if getattr(backbone, "model_type", "") == "timm_backbone":
        return getattr(backbone, "backbone", None) or "unknown"
    if getattr(config, "use_timm_backbone", False):
        return getattr(config, "backbone", None) or "unknown"
    return None


def needs_conversion(config) -> bool:
    """A DETR-family config with a timm backbone, on a machine without timm."""
    return timm_backbone_name(config) is not None and importlib.util.find_spec("timm") is None


def timm_free_checkpoint(ref: str, config, cache_dir: Path) -> Path:
    """A cached copy of checkpoint ``ref`` that transformers loads without timm."""
    name = timm_backbone_name(config)
    if name not in RESNETS or getattr(config, "dilation", False) or getattr(config, "num_feature_levels", 1) != 1:
        raise VisionLoraError(
            f"{ref}: this checkpoint's backbone ({name}) needs timm (pip install timm); without timm, "
            f"visionlora loads DETR checkpoints with a {', '.join(RESNETS)} backbone"
        )
    weights = _checkpoint_file(ref)
    stat = Path(weights).stat()
    key = hashlib.sha256(f"{Path(weights).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{FORMAT_VERSION}"
                         .encode()).hexdigest()[:24]
    target = cache_dir / "timm-free" / key
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp:
        _write_converted(ref, config, name, Path(weights), tmp)
    return target


def _checkpoint_file(ref: str) -> str:
    from transformers.utils import cached_file

    try:
        found = cached_file(ref, "model.safetensors")
    except OSError as err:
        raise VisionLoraError(f"{ref}: no safetensors weights to convert ({str(err).splitlines()[0]})") from None
    if found is None:
        raise VisionLoraError(f"{ref}: no safetensors weights to convert")
    return found


LAST_STAGE: dict[str, Any] = {"out_features": ["stage4"]}  # through **kwargs, which ResNetConfig's signature leaves out


def _write_converted(ref: str, config, name: str, weights: Path, folder: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoImageProcessor, ResNetConfig

    block, depths = RESNETS[name]
    data = config.to_dict()
    data.update(use_timm_backbone=False, backbone=None, use_pretrained_backbone=False, backbone_kwargs=None,
                **{CONVERTED_MARK: name},
                backbone_config=ResNetConfig(layer_type=block, depths=depths, hidden_sizes=WIDTHS[block],
                                             embedding_size=64, **LAST_STAGE).to_dict())
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    state = load_file(str(weights))
    save_file({backbone_name(ref, key): tensor.contiguous() for key, tensor in state.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    try:
        AutoImageProcessor.from_pretrained(ref, backend="pil").save_pretrained(folder)
    except OSError:
        pass  # no processor in the checkpoint: the caller's default applies


def backbone_name(ref: str, key: str) -> str:
    """``key`` with a timm backbone tensor name rewritten to transformers' ResNet name."""
    match = BACKBONE.match(key)
    if match is None:
        return key
    prefix, name = match[1], match[2]
    for pattern, rename in RULES:
        found = pattern.match(name)
        if found:
            return prefix + rename(found)
    raise VisionLoraError(f"{ref}: backbone tensor {key} has no counterpart in transformers' ResNet")


def check_backbone_loaded(ref: str, loading_info: dict[str, Any]) -> None:
    """Stop when a backbone tensor was left over, missing (newly initialised) or of another shape."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        for item in loading_info.get(kind) or []:
            key = item[0] if isinstance(item, tuple) else item
            if "backbone" in str(key):
                raise VisionLoraError(f"{ref}: backbone tensor {key} is {kind.split('_')[0]} after converting the timm "
                                      "backbone; not loading a partly random backbone")


def is_converted(model) -> bool:
    """Whether ``model`` was loaded from a converted timm-backbone checkpoint."""
    return bool(getattr(model.config, CONVERTED_MARK, None))


def train_like_timm(model) -> None:
    """Train the backbone stages timm's DETR trains (layer2-4, transformers' stages 1-3); the stem
    and layer1 stay frozen. (DETR's own rule is written for timm's names.)"""
    for name, parameter in model.named_parameters():
        if ".backbone." in name:
            parameter.requires_grad_(bool(re.search(r"encoder\.stages\.[123]\.", name)))

