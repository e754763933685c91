"""Adapters through peft (LoRA, DoRA, LoHa, LoKr, OFT): target-module resolution, wrapping,
parameter counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

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

METHODS = ("lora", "dora", "loha", "lokr", "oft")  # adapter kinds of --mode lora (peft)


def adaptable_names(model: torch.nn.Module, exclude: Sequence[str] = ()) -> dict[str, int]:
    """Last name component of each adaptable layer -> how many layers carry it."""
    counts: dict[str, int] = {}
    for full_name, module in model.named_modules():
        if isinstance(module, ADAPTABLE) and not any(_within(full_name, head) for head in exclude):
            leaf = full_name.rsplit(".", 1)[-1]
            counts[leaf] = counts.get(leaf, 0) + 1
    return counts


def resolve_target_modules(model: torch.nn.Module, requested: list[str], exclude: Sequence[str] = ()) -> list[str]:
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
class AdapterSetup:
    """The adapter as asked for and as applied."""

    requested: dict[str, Any]
    resolved: dict[str, Any]


def adapter_config(method: str, model: torch.nn.Module, r: int, alpha: float, dropout: float,
                   targets: list[str], heads: list[str]):
    """peft's config for ``method`` on the resolved ``targets``; heads are trained in full.

    LoRA and DoRA (LoRA with a learned magnitude) read r, alpha and dropout; LoHa and LoKr
    read r and alpha; OFT reads r as the size of its orthogonal blocks, which must divide the
    width of every adapted layer.
    """
    import peft

    # peft annotates alpha as int, but any positive number scales the update (alpha / r)
    if method in ("lora", "dora"):
        return peft.LoraConfig(r=r, lora_alpha=alpha,  # type: ignore[arg-type]  # peft accepts a float alpha
                               lora_dropout=dropout, bias="none", use_dora=method == "dora",
                               target_modules=targets, modules_to_save=heads)
    if method == "loha":
        return peft.LoHaConfig(r=r, alpha=alpha,  # type: ignore[arg-type]  # peft accepts a float alpha
                               target_modules=targets, modules_to_save=heads)
    if method == "lokr":
        return peft.LoKrConfig(r=r, alpha=alpha,  # type: ignore[arg-type]  # peft accepts a float alpha
                               target_modules=targets, modules_to_save=heads)
    if method == "oft":
        widths = {m.in_features for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets}
        if any(width % r for width in widths):
            raise VisionLoraError(f"--method oft: --lora-r {r} is OFT's block size and must divide the width "
                                  f"of every adapted layer ({', '.join(map(str, sorted(widths)))})")
        return peft.OFTConfig(r=0, oft_block_size=r, target_modules=targets, modules_to_save=heads)
    raise VisionLoraError(f"--method {method}: unknown (choose from {', '.join(METHODS)})")


def apply_adapter(model: torch.nn.Module, r: int, alpha: float, dropout: float, targets: list[str], heads: list[str],
               method: str = "lora"):
    """Wrap ``model`` with an adapter of ``method`` (LoRA by default); the heads are trained in
    full and saved with it."""
    from peft import get_peft_model

    resolved = resolve_target_modules(model, targets, exclude=heads)
    peft_model = get_peft_model(model, adapter_config(method, model, r, alpha, dropout, resolved, heads))
    setup = AdapterSetup(
        requested={"method": method, "r": r, "alpha": alpha, "dropout": dropout, "target_modules": list(targets)},
        resolved={"target_modules": resolved, "modules_to_save": heads, "adapted_layers": adapted_layers(peft_model)},
    )
    return peft_model, setup


def peft_type(config: Any) -> str:
    """peft's name of the adapter method (LORA, LOHA, ...) of a peft config, or of the dict of its
    saved ``adapter_config.json``."""
    kind = config.get("peft_type", "LORA") if isinstance(config, dict) else config.peft_type
    return str(getattr(kind, "value", kind))


def adapter_method(config: Any) -> str:
    """The ``--method`` name (lora, dora, loha, lokr, oft) of a peft config or its saved dict."""
    uses_dora = config.get("use_dora") if isinstance(config, dict) else getattr(config, "use_dora", False)
    kind = peft_type(config).lower()
    return "dora" if kind == "lora" and uses_dora else kind


def is_plain_lora(config: Any) -> bool:
    """Whether a peft config (or its saved dict) is plain LoRA: its update is A and B weights times
    alpha/r alone, so it mixes with other adapters in one batch and exports as onnxruntime adapters."""
    return adapter_method(config) == "lora"


def adapted_layers(model: torch.nn.Module) -> int:
    """How many layers carry an adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for module in model.modules() if isinstance(module, BaseTunerLayer)
               and not type(module).__name__.endswith("Wrapper"))


def described_adapter(model) -> AdapterSetup:
    """The AdapterSetup of a model that already carries its (default) adapter."""
    config = model.peft_config["default"]
    targets = (sorted(config.target_modules) if isinstance(config.target_modules, (set, list))
               else [config.target_modules])
    method = adapter_method(config)
    r = config.oft_block_size if method == "oft" else config.r
    alpha = getattr(config, "lora_alpha", getattr(config, "alpha", None))
    return AdapterSetup(
        requested={"method": method, "r": r, "alpha": alpha, "dropout": getattr(config, "lora_dropout", 0.0),
                   "target_modules": targets},
        resolved={"target_modules": targets, "modules_to_save": sorted(config.modules_to_save or []),
                  "adapted_layers": adapted_layers(model)},
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
