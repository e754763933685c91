"""Mixed-adapter batches: one forward over a shared base, each image with its own adapter and head,
answering as each adapter does alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_nested_close
from visionlora.deploy.prediction import PredictView, predict, predict_mixed
from visionlora.modeling.adapters import adapter_config, resolve_target_modules
from visionlora.modeling.mixed_batches import mixing_refusal, prepare_mixed_batches
from visionlora.tasks import get_task

MODELS = {"classification": "tiny", "detection": "tiny-rtdetr", "pose": "tiny", "segmentation": "tiny"}
OPTIONS = {"detection": {"threshold": 0.0}, "pose": {"boxes": [[[4, 6, 50, 60]], [[0, 0, 63, 63]]] * 3}}


def _adapters(task_name: str, count: int, method: str = "lora"):
    """A tiny base of the task carrying ``count`` adapters with random (non-zero) LoRA and head weights."""
    from peft import get_peft_model

    task = get_task(task_name)
    labels = ["a", "b", "c"]
    model, processor, info = task.model.build_model(MODELS[task_name], labels, 64, "lora")
    heads = task.model.head_modules(model)
    targets = resolve_target_modules(model, list(task.preset.target_modules), exclude=heads)
    config = adapter_config(method, model, 4, 8, 0.0, targets, heads)
    peft_model = get_peft_model(model, config, adapter_name="run0")
    for index in range(1, count):
        peft_model.add_adapter(f"run{index}", adapter_config(method, model, 4, 8, 0.0, targets, heads))
    generator = torch.Generator().manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name or ".modules_to_save." in name:
            with torch.no_grad():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.eval()
    views = [PredictView(f"run{index}", processor, dataclasses.replace(info, labels=[f"{x}{index}" for x in labels]))
             for index in range(count)]
    return task, peft_model, views


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.mark.parametrize("task_name", sorted(MODELS))
def test_a_mixed_batch_answers_as_each_adapter_alone(task_name):
    task, model, views = _adapters(task_name, 3)
    prepare_mixed_batches(model)
    images = _images(6)
    per_image = [views[i % 3] for i in range(6)]  # run0, run1, run2, run0, ...
    mixed = predict_mixed(task, model, images, per_image, **OPTIONS.get(task_name, {}))
    answers = {}
    for index, view in enumerate(views):
        model.set_adapter(view.adapter)
        rows = [i for i in range(6) if i % 3 == index]
        options = {k: [v[i] for i in rows] if k == "boxes" else v for k, v in OPTIONS.get(task_name, {}).items()}
        for row, answer in zip(rows, predict(task, model, view.processor, [images[i] for i in rows], view.info,
                                                  **options)):
            answers[row] = answer
    for row in range(6):
        assert_nested_close(mixed[row], answers[row], where=f"image {row}")
    # the adapters differ, so a mix-up of adapters (or labels) would show
    assert len({str(answers[row]) for row in range(3)}) == 3


def test_dora_and_other_methods_are_refused_mixing_with_a_reason():
    _, lora, _ = _adapters("classification", 1)
    _, dora, _ = _adapters("classification", 1, method="dora")
    _, loha, _ = _adapters("classification", 1, method="loha")
    assert mixing_refusal(lora, "run0") is None
    assert "DoRA" in mixing_refusal(dora, "run0")
    assert "LOHA" in mixing_refusal(loha, "run0")


def test_lora_layers_gather_every_rows_adapter_in_two_batched_products():
    from peft.tuners.lora import Linear as LoraLinear

    from visionlora.modeling.mixed_batches import _gatherable

    _, model, _ = _adapters("classification", 3)
    prepare_mixed_batches(model)
    layer = next(module for module in model.modules() if isinstance(module, LoraLinear))
    rows = ["run2", "run0", "__base__", "run2", "run1"]
    assert _gatherable(layer, ["run0", "run1", "run2"])
    x = torch.randn(5, 7, layer.in_features)
    gathered = layer(x, adapter_names=rows)
    peft_loop = type(layer)._mixed_batch_forward(layer, x, adapter_names=rows)
    assert torch.allclose(gathered, peft_loop, atol=1e-5)
    assert torch.allclose(gathered[2], layer.base_layer(x[2]), atol=1e-6)  # the base rows take no adapter


def test_a_batch_of_one_adapter_answers_as_it_alone_without_gathering(monkeypatch):
    """The one-adapter fast path: every row on one adapter (not the active one) runs that adapter's own
    updates and head, with no gather, and answers exactly as peft's forward with it active; the same
    images inside a mixed batch (gathered) answer alike within float rounding."""
    from visionlora.modeling import mixed_batches

    task, model, views = _adapters("classification", 3)
    prepare_mixed_batches(model)
    images = _images(6)
    model.set_adapter("run1")
    alone = predict(task, model, views[1].processor, images, views[1].info)
    model.set_adapter("run0")
    gathers = []
    stacked = mixed_batches._stacked_updates
    monkeypatch.setattr(mixed_batches, "_stacked_updates", lambda *a: gathers.append(a) or stacked(*a))
    fast = predict_mixed(task, model, images, [views[1]] * 6)
    assert gathers == [] and fast == alone
    mixed = predict_mixed(task, model, images, [views[1], views[0], views[1], views[2], views[1], views[0]])
    assert gathers, "a mixed batch gathers"
    for row in (0, 2, 4):
        assert_nested_close(mixed[row], alone[row], where=f"image {row}")
    assert mixed[1] != alone[1]  # another adapter's row answers otherwise


@pytest.mark.parametrize("recipes", [[(4, 8)] * 3, [(4, 8), (4, 16), (8, 8)]], ids=["one recipe", "mixed recipes"])
def test_gathered_updates_equal_peft_loop_for_any_ranks_and_scalings(recipes):
    """Adapters of one rank and scaling gather with the scaling applied once; others (other ranks or alphas)
    fold each scaling into B and pad ranks: both equal peft's adapter-by-adapter loop."""
    from peft import get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    task = get_task("classification")
    model, _, _ = task.model.build_model("tiny", ["a", "b", "c"], 64, "lora")
    heads = task.model.head_modules(model)
    targets = resolve_target_modules(model, list(task.preset.target_modules), exclude=heads)
    configs = [adapter_config("lora", model, rank, alpha, 0.0, targets, heads) for rank, alpha in recipes]
    peft_model = get_peft_model(model, configs[0], adapter_name="run0")
    for index, config in enumerate(configs[1:], start=1):
        peft_model.add_adapter(f"run{index}", config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.eval()
    prepare_mixed_batches(peft_model)
    layer = next(module for module in peft_model.modules() if isinstance(module, LoraLinear))
    rows = ["run2", "run0", "run1", "run2", "run1"]
    x = torch.randn(5, 7, layer.in_features)
    gathered = layer(x, adapter_names=rows)
    peft_loop = type(layer)._mixed_batch_forward(layer, x, adapter_names=rows)
    assert torch.allclose(gathered, peft_loop, atol=1e-5)
    assert not torch.allclose(gathered, layer.base_layer(x), atol=1e-3)  # the updates are not zero


def test_adapters_that_decode_alike_decode_their_rows_together(monkeypatch):
    """Rows of views with equal decode keys (one label set: a server's adapters of one base and dataset)
    decode in one call; the answers are those of decoding each view's rows apart."""
    task, model, views = _adapters("classification", 3)
    prepare_mixed_batches(model)
    same_labels = [dataclasses.replace(view, info=views[0].info) for view in views]
    keyed = [dataclasses.replace(view, decode_key="one label set") for view in same_labels]
    images, order = _images(6), [0, 1, 2, 0, 1, 2]
    decoded = []
    decode = task.prediction.decode
    monkeypatch.setattr(task.prediction, "decode", lambda part, items, *rest: decoded.append(len(items)) or decode(
        part, items, *rest))
    apart = predict_mixed(task, model, images, [same_labels[i] for i in order])
    assert decoded == [2, 2, 2]
    decoded.clear()
    together = predict_mixed(task, model, images, [keyed[i] for i in order])
    assert decoded == [6]
    assert together == apart
