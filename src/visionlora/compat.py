"""Private parts of torch, Accelerate and peft the package relies on, each behind one function.

None of them has a public equivalent that does the same; each is checked against torch 2.13.0,
accelerate 1.16.0 and peft 0.21.2 (with transformers 5.25.0), and ``tests/test_library_internals.py``
fails when one of them moves or changes what it does.
"""

from __future__ import annotations

from types import MethodType
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from peft.tuners.lora import Linear as LoraLinear


# -- Accelerate ---------------------------------------------------------------------------
def reset_accelerate_state() -> None:
    """Forget the settings of the last Accelerator (precision, gradient accumulation), keeping the
    process group.

    Accelerate keeps them in process-wide singletons and has no public reset: without this, a
    second Accelerator in one process keeps the first one's mixed precision. Checked against
    accelerate 1.16.0 (``AcceleratorState._reset_state(reset_partial_state=False)`` keeps the
    ``PartialState`` that holds the process group; ``GradientState._reset_state()``).
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def pop_original_forward(model: torch.nn.Module) -> Callable[..., Any] | None:
    """The ``forward`` Accelerate's ``prepare`` saved before wrapping ``model`` for mixed precision
    (taken off the model), or None when it wrapped nothing.

    ``prepare`` keeps it in the instance attribute ``_original_forward`` (accelerate 1.16.0);
    the public ``unwrap_model(keep_fp32_wrapper=False)`` instead strips every ``functools.wraps``
    layer, transformers' own decorators of ``forward`` included.
    """
    return model.__dict__.pop("_original_forward", None)


# -- torch --------------------------------------------------------------------------------
def shared_memory_fd(storage: torch.UntypedStorage) -> tuple[int, int]:
    """(file descriptor, size in bytes) of a CPU storage's shared memory, moving it there if needed.

    torch's public ``share_memory_`` gives no descriptor; its own pickling of tensors for other
    processes (``torch.multiprocessing.reductions.reduce_storage``) calls this private method
    (torch 2.13.0). The descriptor belongs to the storage: do not close it.
    """
    fd, nbytes = storage._share_fd_cpu_()
    return fd, nbytes


def storage_from_shared_fd(fd: int, nbytes: int) -> torch.UntypedStorage:
    """A CPU storage mapping ``nbytes`` of the shared memory behind ``fd``, which stays open and the
    caller's (torch duplicates it).

    torch's own unpickling of shared tensors (``torch.multiprocessing.reductions.rebuild_storage_fd``)
    calls this private constructor (torch 2.13.0); no public one maps a descriptor.
    """
    return torch.UntypedStorage._new_shared_fd_cpu(fd, nbytes)  # type: ignore[attr-defined]  # private, not in torch's stubs


# -- peft ---------------------------------------------------------------------------------
def lora_variant_kwarg_keys() -> tuple[str, ...]:
    """The keyword arguments peft's LoRA ``Linear.forward`` gives the LoRA variants but not the base
    layer (``alora_offsets`` in peft 0.21.2, ``peft.tuners.lora.layer.VARIANT_KWARG_KEYS``)."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    return tuple(VARIANT_KWARG_KEYS)


def replace_mixed_batch_forward(layer: LoraLinear,
                                make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Have the peft LoRA ``Linear`` ``layer`` compute mixed-adapter batches with ``make(peft's own
    method)`` (called as ``method(layer, x, *args, adapter_names=..., **kwargs)``); once per layer.

    peft's ``forward`` hands a batch with ``adapter_names`` to ``self._mixed_batch_forward``
    (peft 0.21.2) and offers no public way to change how such a batch is computed.
    """
    if "_mixed_batch_forward" not in vars(layer):
        vars(layer)["_mixed_batch_forward"] = MethodType(make(type(layer)._mixed_batch_forward), layer)
