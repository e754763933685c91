"""The private parts of torch, Accelerate and peft behind ``visionlora.compat`` still exist and do
what the package relies on; and the public replacements of former private uses still cover them."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from visionlora.compat import (
    lora_variant_kwarg_keys,
    pop_original_forward,
    replace_mixed_batch_forward,
    reset_accelerate_state,
    shared_memory_fd,
    storage_from_shared_fd,
)
from visionlora.tasks import get_task


@pytest.fixture
def fresh_accelerate():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


# -- Accelerate ---------------------------------------------------------------------------
def test_accelerate_reset_methods_have_the_expected_signatures():
    from accelerate.state import AcceleratorState, GradientState

    assert "reset_partial_state" in inspect.signature(AcceleratorState._reset_state).parameters
    assert list(inspect.signature(GradientState._reset_state).parameters) == []


def test_reset_lets_a_second_accelerator_take_other_settings_and_keeps_the_process_state(fresh_accelerate):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=4)
    reset_accelerate_state()
    assert not AcceleratorState._shared_state and not GradientState._shared_state
    assert PartialState._shared_state  # the process group lives here and is kept
    second = Accelerator(cpu=True, mixed_precision="no")
    assert second.mixed_precision == "no" and second.gradient_accumulation_steps == 1


def test_prepare_saves_the_original_forward_that_pop_original_forward_returns(fresh_accelerate):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = accelerator.unwrap_model(accelerator.prepare(torch.nn.Linear(3, 2)))
    assert getattr(model.forward, "__func__", None) is not torch.nn.Linear.forward  # wrapped for autocast
    original = pop_original_forward(model)
    assert original.__func__ is torch.nn.Linear.forward and original.__self__ is model
    assert "_original_forward" not in vars(model)
    assert pop_original_forward(torch.nn.Linear(3, 2)) is None  # nothing wrapped, nothing saved


# -- torch --------------------------------------------------------------------------------
def test_a_storage_mapped_from_its_descriptor_shares_its_memory():
    tensor = torch.arange(6, dtype=torch.float32)
    storage = tensor.untyped_storage()
    fd, nbytes = shared_memory_fd(storage)
    assert storage.is_shared() and nbytes == tensor.nbytes
    first, second = (torch.empty(0).set_(storage_from_shared_fd(fd, nbytes), 0, (6,), (1,)) for _ in range(2))
    os.fstat(fd)  # mapping twice leaves the descriptor open
    tensor[0] = 42.0
    second[1] = -1.0
    assert first[0] == 42.0 and tensor[1] == -1.0
    assert shared_memory_fd(storage)[1] == nbytes


def test_register_parameter_replaces_a_parameter_with_another_modules_own():
    """How the server shares a base's weights between heads: the same Parameter object in both."""
    owner, borrower = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    borrower.register_parameter("weight", owner.weight)
    assert borrower.weight is owner.weight and dict(borrower.named_parameters())["weight"] is owner.weight
    x = torch.ones(1, 3)
    assert torch.equal(borrower(x), torch.nn.functional.linear(x, owner.weight, borrower.bias))


def test_the_public_batch_norms_are_all_of_torch_nn_and_stay_frozen_in_lora_mode():
    public = {name for name in dir(torch.nn) if "BatchNorm" in name and not name.startswith("Lazy")}
    assert public == {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"}
    model = torch.nn.ModuleList([getattr(torch.nn, name)(4) for name in sorted(public)] + [torch.nn.LayerNorm(4)])
    model.train()
    get_task("classification").model.prepare_for_training(model, "lora")
    assert [module.training for module in model] == [False] * len(public) + [True]


# -- peft ---------------------------------------------------------------------------------
def _lora_linear():
    import peft

    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 3)),
                                peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    return model.eval(), model.base_model.model[0]


def test_lora_linear_hands_mixed_batches_to_the_replaced_method():
    from peft.tuners.lora import Linear as LoraLinear

    signature = inspect.signature(LoraLinear._mixed_batch_forward)
    assert list(signature.parameters)[:2] == ["self", "x"]
    assert signature.parameters["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY
    model, layer = _lora_linear()
    calls = []

    def make(peft_loop):
        def recording(module, x, *args, adapter_names, **kwargs):
            calls.append(list(adapter_names))
            return peft_loop(module, x, *args, adapter_names=adapter_names, **kwargs)

        return recording

    x = torch.randn(2, 4)
    expected = model(x, adapter_names=["default", "__base__"])
    replace_mixed_batch_forward(layer, make)
    replace_mixed_batch_forward(layer, make)  # again, as after adding adapters: still one call per forward
    assert torch.allclose(model(x, adapter_names=["default", "__base__"]), expected)
    assert calls == [["default", "__base__"]]
    model(x)
    assert len(calls) == 1  # a batch without adapter_names takes peft's usual path


def test_lora_variant_kwarg_keys_are_names_peft_keeps_from_the_base_layer():
    keys = lora_variant_kwarg_keys()
    assert keys and all(isinstance(key, str) for key in keys)
    _, layer = _lora_linear()
    seen = {}

    def make(peft_loop):
        def spy(module, x, *args, adapter_names, **kwargs):
            seen.update(kwargs)
            return peft_loop(module, x, *args, adapter_names=adapter_names, **kwargs)

        return spy

    replace_mixed_batch_forward(layer, make)
    layer(torch.randn(2, 4), adapter_names=["default", "default"])
    assert set(keys) <= set(seen)  # peft passes each variant argument on to the mixed-batch method
