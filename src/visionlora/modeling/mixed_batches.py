"""Mixed-adapter batches: one forward over a shared base, each row with its own LoRA adapter and head.

peft runs the base once for a batch given ``adapter_names`` (one per row) and adds each row's
own LoRA update, one adapter after another. Here two of its steps are replaced:

- a LoRA linear layer gathers each row's A and B matrices (padded with zeros to the largest
  rank) and applies them all in two batched matrix products (as Punica's BGMV kernel does), so a
  forward costs the same whether its rows use 1 adapter or 32, in inference and in training; the
  adapters' common scaling is applied once to the update, not to each adapter's B. A batch whose
  adapters each hold one run of rows (a packed training batch, or a batch of one adapter) takes
  each run's update on its slice instead, as peft computes it for one adapter;
  layers it cannot gather for (a variant, a bias on B, dropout while training) keep peft's loop;
- a trained head of any kind mixes (peft's wrapper mixes only plain Linear, Embedding and Conv
  heads fed one tensor): plain Linear heads fed one tensor gather each row's weights and run as
  one batched product; other heads' inputs are split by adapter (any batch-first tensors, also
  inside lists and tuples), each adapter's own head runs on its rows, and the outputs are put
  back in row order. A batch of one adapter runs its head as it is.

The row indices both need are made once per batch, on the model's device (:class:`MixedRows`), and
every layer reuses them: no layer copies indices from the host.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType
from typing import Any, Sequence, cast

import torch

from visionlora.compat import lora_variant_kwarg_keys, replace_mixed_batch_forward
from visionlora.modeling.adapters import adapter_method, is_plain_lora, peft_type

BASE_ROWS = "__base__"  # peft's name for rows that take no adapter


class MixedRows(list):
    """Each row's adapter name (a list, as peft takes ``adapter_names``), with the row indices of a
    mixed forward made once for the batch on ``device``, in one copy from the host.

    ``adapters``: the names in order of first appearance; ``positions``: each row's place in
    ``adapters``; ``rows``: each adapter's rows; ``runs``: each adapter's run of rows, when its rows
    are one run and ``by_runs`` (else None: the layers gather).
    """

    def __init__(self, adapter_names: Sequence[str], device: torch.device | str, by_runs: bool = True):
        super().__init__(adapter_names)
        by_adapter = rows_by_adapter(list(adapter_names))
        self.adapters = list(by_adapter)
        place = {name: position for position, name in enumerate(self.adapters)}
        positions, *rows = index_tensors([[place[name] for name in self], *by_adapter.values()], device)
        self.positions: torch.Tensor = positions
        self.rows: dict[str, torch.Tensor] = dict(zip(self.adapters, rows))
        self.runs = adapter_runs(list(adapter_names)) if by_runs or len(self.adapters) == 1 else None


def adapter_runs(adapter_names: list[str]) -> list[tuple[str, int, int]] | None:
    """(adapter, first row, end row) of each adapter when its rows are one run (a packed training batch:
    each job's rows together), in row order; None when an adapter's rows are scattered."""
    runs: list[tuple[str, int, int]] = []
    for row, name in enumerate(adapter_names):
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1], row + 1)
        elif any(run[0] == name for run in runs):
            return None
        else:
            runs.append((name, row, row + 1))
    return runs


def index_tensors(groups: Sequence[Sequence[int]], device: torch.device | str) -> list[torch.Tensor]:
    """One index tensor on ``device`` per group of integers, all made by one copy from the host."""
    flat = torch.tensor([value for group in groups for value in group], dtype=torch.long, device=device)
    return list(flat.split([len(group) for group in groups]))


def mixing_refusal(peft_model, adapter: str) -> str | None:
    """Why ``adapter`` of ``peft_model`` cannot share a forward with other adapters, or None."""
    config = peft_model.peft_config[adapter]
    if is_plain_lora(config):
        return None
    if adapter_method(config) == "dora":
        return "DoRA adapters run one adapter per forward (peft cannot mix DoRA)"
    return f"{peft_type(config)} adapters run one adapter per forward (peft mixes LoRA adapters only)"


def prepare_mixed_batches(peft_model) -> None:
    """Let every LoRA layer and trained head of ``peft_model`` take mixed-adapter batches; call it
    again after adding adapters that adapt other layers (idempotent)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    layers: list[ModulesToSaveWrapper | LoraLayer] = []
    for module in peft_model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            if "forward" not in vars(module):
                vars(module)["forward"] = MethodType(_forward_by_adapter(type(module).forward), module)
            layers.append(module)
        elif isinstance(module, LoraLayer):
            if isinstance(module, LoraLinear):
                replace_mixed_batch_forward(module, _gathered_lora)
            layers.append(module)
    peft_model.mixing_layers = layers


@contextmanager
def mixed_rows(peft_model, adapter_names: list[str], by_runs: bool = True):
    """Within it, a forward of ``peft_model`` gives row i adapter ``adapter_names[i]``.

    As peft's ``adapter_names`` argument does, but with the layers found once by
    :func:`prepare_mixed_batches` rather than by two walks over the model (and every adapter
    in it) per forward. With ``by_runs`` (a packed training batch), adapters whose rows are one
    run each take their updates run by run, as peft computes one adapter's; without it only a
    batch of one adapter does, and any other mix gathers (fewer operations per layer for many
    adapters).
    """
    if not hasattr(peft_model, "mixing_layers"):
        prepare_mixed_batches(peft_model)
    rows = MixedRows(adapter_names, next(peft_model.parameters()).device, by_runs)

    def give_rows(module, args, kwargs):
        return args, {**kwargs, "adapter_names": rows}

    handles = [layer.register_forward_pre_hook(give_rows, with_kwargs=True) for layer in peft_model.mixing_layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _gathered_lora(peft_loop):
    variant_keys = lora_variant_kwarg_keys()  # per-variant arguments peft does not give the base layer

    def mixed_batch_forward(layer, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        adapters = _adapters(adapter_names)
        present = [name for name in adapters if name in layer.lora_A]
        if not _gatherable(layer, present):
            return peft_loop(layer, x, *args, adapter_names=adapter_names, **kwargs)
        result = layer.base_layer(x, *args, **{k: v for k, v in kwargs.items() if k not in variant_keys})
        runs = adapter_names.runs if isinstance(adapter_names, MixedRows) else None
        if runs is not None:
            return result + _updates_by_run(layer, x, runs, result)
        a, b, scaling = _stacked_updates(layer, adapters, present)  # (n, rank, in), (n, out, rank), a float
        rows = _mixed(adapter_names, a.device).positions.to(a.device)
        flat = x.to(a.dtype).reshape(x.shape[0], -1, x.shape[-1])
        update = torch.bmm(torch.bmm(flat, a[rows].transpose(1, 2)), b[rows].transpose(1, 2))
        return result.add(update.reshape(result.shape).to(result.dtype), alpha=scaling)

    return mixed_batch_forward


def _updates_by_run(layer, x: torch.Tensor, runs: list[tuple[str, int, int]], result: torch.Tensor) -> torch.Tensor:
    """Each run of rows' own LoRA update, computed as peft computes one adapter's (``B(A(x)) * scaling``) on a
    slice of the batch, joined in row order; zeros for rows whose adapter does not adapt this layer."""
    parts = []
    for name, start, end in runs:
        if name not in layer.lora_A:
            parts.append(result.new_zeros((end - start, *result.shape[1:])))
            continue
        weight = layer.lora_A[name].weight
        update = layer.lora_B[name](layer.lora_A[name](x[start:end].to(weight.dtype))) * layer.scaling[name]
        parts.append(update.to(result.dtype))
    return torch.cat(parts)


def _stacked_updates(layer, adapters: list[str], present: list[str]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Every adapter's A and B stacked, and the scaling of their product: where every row's adapter adapts
    this layer with one rank and one scaling (adapters of one recipe), the weights as they are and that
    scaling; else each B times its own scaling and A padded with zeros to the largest rank, zeros for rows
    whose adapter does not adapt this layer (the base's rows, or a job that targets other layers), and a
    scaling of 1. Zero padding is exact, in the forward and in the gradients: a padded row of A meets a
    zero column of B."""
    weights = {name: _lora_weights(layer, name) for name in present}
    if len(present) == len(adapters):
        scalings = {layer.scaling[name] for name in present}
        ranks = {a.shape[0] for a, _ in weights.values()}
        if len(scalings) == 1 and len(ranks) == 1:
            return (torch.stack([a for a, _ in weights.values()]), torch.stack([b for _, b in weights.values()]),
                    float(scalings.pop()))
    rank = max(a.shape[0] for a, _ in weights.values())
    first_a, first_b = weights[present[0]]
    zero_a = first_a.new_zeros((rank, first_a.shape[1]))
    zero_b = first_b.new_zeros((first_b.shape[0], rank))
    a_parts, b_parts = [], []
    for name in adapters:
        if name not in weights:
            a_parts.append(zero_a)
            b_parts.append(zero_b)
            continue
        a_weight, b_weight = weights[name][0], weights[name][1] * layer.scaling[name]
        missing = rank - a_weight.shape[0]
        a_parts.append(torch.nn.functional.pad(a_weight, (0, 0, 0, missing)) if missing else a_weight)
        b_parts.append(torch.nn.functional.pad(b_weight, (0, missing)) if missing else b_weight)
    return torch.stack(a_parts), torch.stack(b_parts), 1.0


def _parameter(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """``module``'s own parameter ``name`` (None where it has none), read from its parameter dict: on a small
    layer, nn.Module's attribute lookup costs more than the arithmetic, and a mixed batch makes it once per
    adapter per layer."""
    return module._parameters.get(name)


def _lora_weights(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``name``'s A and B weights in the LoRA ``layer``."""
    return (cast(torch.Tensor, _parameter(layer.lora_A._modules[name], "weight")),
            cast(torch.Tensor, _parameter(layer.lora_B._modules[name], "weight")))


def _gatherable(layer, adapters: list[str]) -> bool:
    """Whether these adapters' updates of ``layer`` stack: plain LoRA without a bias on B, and no dropout
    to draw while training (peft's loop draws each adapter's own)."""
    if not adapters or any(name in layer.lora_variant or _parameter(layer.lora_B._modules[name], "bias") is not None
                           for name in adapters):
        return False
    return not (layer.training and any(not isinstance(layer.lora_dropout[name], torch.nn.Identity)
                                       for name in adapters))


def _forward_by_adapter(plain_forward):
    def forward(wrapper, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any):
        if adapter_names is None:
            return plain_forward(wrapper, *args, **kwargs)
        rows = _mixed(adapter_names, "cpu")
        heads = [wrapper.original_module if name == BASE_ROWS else wrapper.modules_to_save[name]
                 for name in rows.adapters]
        if len(heads) == 1:  # one adapter: its head as it is
            return heads[0](*args, **kwargs)
        linear = _linear_heads(heads, args, kwargs, len(rows))
        if linear is not None:
            return _gathered_linear(*linear, args[0], rows.positions)
        parts = [(index, head(*select_rows(args, index, len(rows)), **select_rows(kwargs, index, len(rows))))
                 for head, index in zip(heads, rows.rows.values())]
        return _stitch(parts, len(rows))

    return forward


def _linear_heads(heads: list[torch.nn.Module], args: tuple, kwargs: dict[str, Any],
                  batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None] | None:
    """The heads' weights and biases (None: none has one), when they are plain Linear layers of one shape fed
    one batch-first tensor; else None."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2 \
            or args[0].shape[0] != batch or any(type(head) is not torch.nn.Linear for head in heads):
        return None
    weights = [cast(torch.Tensor, _parameter(head, "weight")) for head in heads]
    biases = [_parameter(head, "bias") for head in heads]
    if any(weight.shape != weights[0].shape for weight in weights):
        return None
    if all(bias is None for bias in biases):
        return weights, None
    return (weights, cast("list[torch.Tensor]", biases)) if all(bias is not None for bias in biases) else None


def _gathered_linear(weights: list[torch.Tensor], biases: list[torch.Tensor] | None, x: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """Each row through its own adapter's Linear head, as one batched product of the rows' gathered weights."""
    weight = torch.stack(weights)  # (n, out, in)
    rows = positions.to(weight.device)
    flat = x.to(weight.dtype).reshape(x.shape[0], -1, x.shape[-1])
    out = torch.bmm(flat, weight[rows].transpose(1, 2))
    if biases is not None:
        out = out + torch.stack(biases)[rows].unsqueeze(1)
    return out.reshape(*x.shape[:-1], weight.shape[1])


def _adapters(adapter_names: list[str]) -> list[str]:
    """The adapters of a batch's rows, in order of first appearance."""
    return adapter_names.adapters if isinstance(adapter_names, MixedRows) else list(dict.fromkeys(adapter_names))


def _mixed(adapter_names: list[str], device: torch.device | str) -> MixedRows:
    """``adapter_names`` with its row indices: those :func:`mixed_rows` made for the batch, else made
    now on ``device`` (a layer called with a plain list)."""
    return adapter_names if isinstance(adapter_names, MixedRows) else MixedRows(adapter_names, device)


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
        items = [select_rows(item, index, batch) for item in value]
        return type(value)(items) if type(value) in (list, tuple) else type(value)(*items)
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
        columns = [_stitch([(index, output[i]) for index, output in parts], batch) for i in range(len(first))]
        return type(first)(columns) if type(first) in (list, tuple) else type(first)(*columns)
    if first is None:
        return None
    raise TypeError(f"a head returned {type(first).__name__}, which cannot be split by adapter")
