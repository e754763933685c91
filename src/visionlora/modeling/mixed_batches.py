"""Mixed-adapter batches: one forward over a shared base, each row with its own LoRA adapter and head.

peft runs the base once for a batch given ``adapter_names`` (one per row) and adds each row's
own LoRA update. Its trained-head wrapper (``ModulesToSaveWrapper``) mixes only plain Linear,
Embedding and Conv heads and expects one batch-first tensor; here every wrapped head mixes:
its inputs are split by adapter (any batch-first tensors, also inside lists and tuples), each
adapter's own head runs on its rows, and the outputs are put back in row order.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch

BASE_ROWS = "__base__"  # peft's name for rows that take no adapter


def mixing_refusal(peft_model, adapter: str) -> str | None:
    """Why ``adapter`` of ``peft_model`` cannot share a forward with other adapters, or None."""
    config = peft_model.peft_config[adapter]
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind != "LORA":
        return f"{kind} adapters run one adapter per forward (peft mixes LoRA adapters only)"
    if getattr(config, "use_dora", False):
        return "DoRA adapters run one adapter per forward (peft cannot mix DoRA)"
    return None


def allow_any_head(peft_model) -> None:
    """Let every trained head of ``peft_model`` take part in mixed-adapter forwards (idempotent)."""
    from peft.utils.other import ModulesToSaveWrapper

    for module in peft_model.modules():
        if isinstance(module, ModulesToSaveWrapper) and "forward" not in vars(module):
            module.forward = MethodType(_forward_by_adapter(type(module).forward), module)


def _forward_by_adapter(plain_forward):
    def forward(wrapper, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        if adapter_names is None:
            return plain_forward(wrapper, *args, **kwargs)
        parts = []
        for adapter, rows in rows_by_adapter(adapter_names).items():
            head = wrapper.original_module if adapter == BASE_ROWS else wrapper.modules_to_save[adapter]
            index = torch.tensor(rows)
            parts.append((index, head(*select_rows(args, index, len(adapter_names)),
                                      **select_rows(kwargs, index, len(adapter_names)))))
        return _stitch(parts, len(adapter_names))

    return forward


def rows_by_adapter(adapter_names: list[str]) -> dict[str, list[int]]:
    """Row indices per adapter, in order of first appearance."""
    rows: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        rows.setdefault(name, []).append(row)
    return rows


def select_rows(value: Any, index: torch.Tensor, batch: int) -> Any:
    """``value`` with every batch-first tensor in it (of ``batch`` rows) cut to the rows in ``index``;
    lists, tuples, dicts and model outputs are walked, anything else is kept."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        picked = {key: select_rows(item, index, batch) for key, item in value.items()}
        return type(value)(**picked) if type(value) is not dict else picked
    if isinstance(value, (list, tuple)):
        picked = [select_rows(item, index, batch) for item in value]
        return type(value)(picked) if type(value) in (list, tuple) else type(value)(*picked)
    return value


def _stitch(parts: list[tuple[torch.Tensor, Any]], batch: int) -> Any:
    """The outputs of each adapter's rows, put back in row order (the inverse of ``select_rows``)."""
    first = parts[0][1]
    if isinstance(first, torch.Tensor):
        stitched = first.new_empty((batch, *first.shape[1:]))
        for index, output in parts:
            stitched[index.to(stitched.device)] = output
        return stitched
    if isinstance(first, dict):
        joined = {key: _stitch([(index, output[key]) for index, output in parts], batch) for key in first}
        return type(first)(**joined) if type(first) is not dict else joined
    if isinstance(first, (list, tuple)):
        joined = [_stitch([(index, output[i]) for index, output in parts], batch) for i in range(len(first))]
        return type(first)(joined) if type(first) in (list, tuple) else type(first)(*joined)
    if first is None:
        return None
    raise TypeError(f"a head returned {type(first).__name__}, which cannot be split by adapter")
