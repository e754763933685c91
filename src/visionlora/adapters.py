"""LoRA through peft: target-module resolution, wrapping, parameter counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from visionlora.errors import VisionLoraError

# Seed names used by presets and older ViT checkpoints, and their transformers 5 names.
ALIASES = {
    "query": ("q_proj",),
    "key": ("k_proj",),
    "value": ("v_proj",),
    "q_proj": ("query",),
    "k_proj": ("key",),
    "v_proj": ("value",),
}
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)


def adaptable_names(model: torch.nn.Module, exclude: list[str] = ()) -> dict[str, int]:
    """Last name component of each LoRA-adaptable layer -> how many layers carry it."""
    counts: dict[str, int] = {}
    for full_name, module in model.named_modules():
        if isinstance(module, ADAPTABLE) and not any(_within(full_name, head) for head in exclude):
            leaf = full_name.rsplit(".", 1)[-1]
            counts[leaf] = counts.get(leaf, 0) + 1
    return counts


def resolve_target_modules(model: torch.nn.Module, requested: list[str], exclude: list[str] = ()) -> list[str]:
    """Map requested names onto the model's own layer names.

    A name the model has is kept; otherwise its alias (``query`` <-> ``q_proj``) is
    used; a name matching neither is an error that lists the candidates.
    """
    available = adaptable_names(model, exclude)
    resolved: list[str] = []
    for name in requested:
        match = name if name in available else next((a for a in ALIASES.get(name, ()) if a in available), None)
        if match is None:
            candidates = ", ".join(sorted(available))
            raise VisionLoraError(
                f"target module {name!r} matches no layer of {type(model).__name__}; candidates: {candidates}"
            )
        if match not in resolved:
            resolved.append(match)
    return resolved


@dataclass
class LoraSetup:
    """The adapter as asked for and as applied."""

    requested: dict[str, Any]
    resolved: dict[str, Any]


def apply_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float, targets: list[str], heads: list[str]):
    """Wrap ``model`` with a LoRA adapter; the heads are trained in full and saved with it."""
    from peft import LoraConfig, get_peft_model

    resolved = resolve_target_modules(model, targets, exclude=heads)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=resolved,
        modules_to_save=heads,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    adapted = sum(1 for name, _ in peft_model.named_modules() if name.endswith("lora_A"))
    setup = LoraSetup(
        requested={"r": r, "alpha": alpha, "dropout": dropout, "target_modules": list(targets)},
        resolved={"target_modules": resolved, "modules_to_save": heads, "adapted_layers": adapted},
    )
    return peft_model, setup


def described_lora(model) -> LoraSetup:
    """The LoraSetup of a model that already carries its (default) adapter."""
    config = model.peft_config["default"]
    targets = sorted(config.target_modules) if isinstance(config.target_modules, (set, list)) else [config.target_modules]
    adapted = sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))
    return LoraSetup(
        requested={"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout, "target_modules": targets},
        resolved={"target_modules": targets, "modules_to_save": sorted(config.modules_to_save or []), "adapted_layers": adapted},
    )


def lower_frozen_weights(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Store the frozen weights of linear and convolution layers in ``dtype``; returns the originals.

    Under autocast to ``dtype`` these layers cast their weights to it on every forward and
    keep the copies for the backward pass; stored in ``dtype`` they need no copies, and the
    results are the same (the cast is the same rounding). Biases and norm weights stay as they are.
    """
    originals = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, ADAPTABLE) and isinstance(weight, torch.nn.Parameter) and not weight.requires_grad \
                and weight.dtype != dtype:
            originals[f"{name}.weight"] = weight.detach()
            module.weight = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    return originals


def restore_weights(model: torch.nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Put back weights that :func:`lower_frozen_weights` replaced."""
    modules = dict(model.named_modules())
    for name, tensor in originals.items():
        module_name, _, attribute = name.rpartition(".")
        setattr(modules[module_name], attribute, torch.nn.Parameter(tensor, requires_grad=False))


def parameter_counts(model: torch.nn.Module) -> dict[str, Any]:
    """Total and trainable parameters (an adapter's head copies counted once)."""
    total = trainable = 0
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return {"total": total, "trainable": trainable, "trainable_percent": round(100.0 * trainable / max(total, 1), 4)}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")
