"""Adapter slots: places for adapters in one peft model, reused as runs come and go.

Adding an adapter to a peft model walks the whole model (and every adapter already in it), so
it grows slower the more adapters a base holds. A slot is made that way once; afterwards a run
whose adapter has the same configuration (method, rank, alpha, target layers, heads) loads into
a free slot by copying its saved tensors in place: the cost of reading its file. Slots are
named ``slot0``, ``slot1``, ... and hold any run's adapter in turn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from peft import PeftModel

# adapter_config.json fields that name where an adapter came from, not what it computes
_PROVENANCE = ("base_model_name_or_path", "revision", "inference_mode", "peft_version")


class AdapterSlots:
    """The adapter slots of one peft model: which are free, and the model's tensors of each."""

    def __init__(self) -> None:
        self.free: dict[str, list[str]] = {}  # configuration -> free slots made for it
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}  # slot -> saved key -> the model's tensor
        self.configuration: dict[str, str] = {}
        self.made = 0
        self.model: PeftModel | None = None  # the peft model the slots are in (made with the first)

    def fill(self, adapter_dir: Path, make: Callable[[str], Any]) -> str:
        """A slot holding the adapter saved in ``adapter_dir``: a free slot of its configuration
        overwritten with its tensors, else a new one made by ``make(slot)`` (a peft load returning
        the peft model)."""
        from safetensors.torch import load_file

        configuration = _configuration(adapter_dir)
        free = self.free.get(configuration, [])
        if free:
            saved = load_file(adapter_dir / "adapter_model.safetensors")
            slot = free.pop()
            targets = self.tensors[slot]
            if saved.keys() == targets.keys() and all(saved[k].shape == targets[k].shape for k in saved):
                with torch.no_grad():
                    for key, tensor in saved.items():
                        targets[key].copy_(tensor)
                return slot
            free.append(slot)  # same configuration, other tensors (another base layout): a slot of its own
        return self._make(configuration, make)

    def release(self, slot: str) -> None:
        """``slot`` may hold another adapter of its configuration now."""
        self.free.setdefault(self.configuration[slot], []).append(slot)

    def _make(self, configuration: str, make: Callable[[str], Any]) -> str:
        from peft import get_peft_model_state_dict

        slot = f"slot{self.made}"
        try:
            self.model = make(slot)
        except BaseException:  # e.g. out of memory halfway: peft may hold a partial adapter by that name
            if self.model is not None and slot in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(slot)
            raise
        self.made += 1
        self.tensors[slot] = get_peft_model_state_dict(self.model, adapter_name=slot)  # views of the model's weights
        self.configuration[slot] = configuration
        return slot


def _configuration(adapter_dir: Path) -> str:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return json.dumps({k: v for k, v in config.items() if k not in _PROVENANCE}, sort_keys=True, default=str)
