"""LoRA target resolution and classification metrics."""

from __future__ import annotations

import pytest
import torch

from visionlora.errors import VisionLoraError
from visionlora.metrics.classification import classification_metrics
from visionlora.modeling.adapters import apply_adapter, parameter_counts, resolve_target_modules
from visionlora.tasks import get_task


@pytest.fixture
def tiny_vit():
    model, _, _ = get_task("classification").model.build_model("tiny", ["a", "b", "c"], None, "lora")
    return model


def test_seed_names_resolve_to_transformers5_names(tiny_vit):
    assert resolve_target_modules(tiny_vit, ["query", "value"]) == ["q_proj", "v_proj"]
    assert resolve_target_modules(tiny_vit, ["q_proj", "fc1"]) == ["q_proj", "fc1"]


def test_old_names_resolve_on_models_that_use_them():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = (torch.nn.Linear(4, 4) for _ in range(3))

    assert resolve_target_modules(Attention(), ["q_proj", "value"]) == ["query", "value"]


def test_unknown_target_lists_candidates(tiny_vit):
    with pytest.raises(VisionLoraError,
                       match=r"'qkv' matches no layer of ViTForImageClassification; candidates: .*q_proj"):
        resolve_target_modules(tiny_vit, ["qkv"])


def test_head_is_not_a_lora_target(tiny_vit):
    with pytest.raises(VisionLoraError, match="'classifier' matches no layer"):
        resolve_target_modules(tiny_vit, ["classifier"], exclude=["classifier"])


def test_apply_lora_trains_adapters_and_head_only(tiny_vit):
    total_before = sum(p.numel() for p in tiny_vit.parameters())
    model, setup = apply_adapter(tiny_vit, r=4, alpha=8, dropout=0.0, targets=["query", "value"], heads=["classifier"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "classifier.modules_to_save" in name for name in trainable)
    assert setup.resolved == {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier"],
                              "adapted_layers": 4}
    counts = parameter_counts(model)
    lora_params = 2 * 2 * (4 * 64 + 64 * 4)  # 2 layers x (q, v) x (A + B)
    assert counts["total"] == total_before + lora_params
    assert counts["trainable"] == lora_params + 64 * 3 + 3


def test_classification_metrics_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0])
    logits = torch.nn.functional.one_hot(predicted, 3).float()
    metrics = classification_metrics(logits, labels, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.5}
    # F1: a: p=1/2 r=1/2 -> .5; b: p=2/3 r=1 -> .8; c: p=1 r=.5 -> 2/3
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert "top5_accuracy" not in metrics


def test_top5_with_more_than_five_classes():
    logits = torch.arange(7.0).repeat(2, 1)  # ranks class 6 first, then 5, 4, 3, 2
    metrics = classification_metrics(logits, torch.tensor([2, 0]), list("abcdefg"))
    assert metrics["accuracy"] == 0.0 and metrics["top5_accuracy"] == 0.5


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr", "oft"])
def test_the_method_and_plain_lora_read_the_same_from_a_config_and_its_saved_file(tiny_vit, method, tmp_path):
    import json

    from visionlora.modeling.adapters import adapter_method, is_plain_lora, peft_type

    model, _ = apply_adapter(tiny_vit, r=4, alpha=8, dropout=0.0, targets=["query", "value"], heads=["classifier"],
                             method=method)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    config = model.peft_config["default"]
    assert adapter_method(config) == adapter_method(saved) == method
    assert is_plain_lora(config) is is_plain_lora(saved) is (method == "lora")
    assert peft_type(config) == peft_type(saved) == {"dora": "LORA"}.get(method, method.upper())
    assert peft_type({}) == "LORA" and is_plain_lora({})  # files of older peft versions name no type
