"""Adapter methods beyond LoRA (--method dora|loha|lokr|oft): train, reload, plain peft, export."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import visionlora
from tests.conftest import tiny_config
from visionlora.cli import main
from visionlora.config import METHODS
from visionlora.deploy.export import export_run
from visionlora.training.engine import train

PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "loha": "LOHA", "lokr": "LOKR", "oft": "OFT"}


@pytest.fixture(scope="module")
def method_runs(class_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return {method: train(tiny_config("classification", class_folder, root / method, epochs=1, method=method))
            for method in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_reloads_identically_and_loads_with_plain_peft(method_runs, class_folder, method, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    result = method_runs[method]
    summary = result.summary
    assert summary["lora"]["requested"]["method"] == method and summary["lora"]["resolved"]["adapted_layers"] == 4
    adapter_config = json.loads((result.paths.model_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == PEFT_TYPES[method]
    assert adapter_config.get("use_dora", False) == (method == "dora")

    images = sorted((class_folder / "val").rglob("*.png"))[:4]
    first, second = visionlora.load(result.paths.root), visionlora.load(result.paths.root)
    assert first.predict(images) == second.predict(images)

    # plain transformers + peft, as the model card says
    base = AutoModelForImageClassification.from_pretrained(result.paths.base_dir)
    plain = PeftModel.from_pretrained(base, result.paths.model_dir).eval()
    pixels = first.processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = first.model(pixel_values=pixels).logits
        theirs = plain(pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs)

    merged = tmp_path / "merged"
    export_run(result.paths.root, merged, "merged")
    for a, b in zip(visionlora.load(merged).predict(images), first.predict(images)):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_method_needs_lora_mode_and_oft_a_dividing_block_size(class_folder, tmp_path, capsys):
    assert main(["train", "--data", str(class_folder), "--model", "tiny", "--mode", "full", "--method", "dora",
                 "--output", str(tmp_path / "a")]) == 2
    assert "--method dora is an adapter: use it with --mode lora" in capsys.readouterr().err
    assert main(["train", "--data", str(class_folder), "--model", "tiny", "--method", "oft", "--lora-r", "24",
                 "--epochs", "1", "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--method oft: --lora-r 24 is OFT's block size and must divide the width of every adapted layer (64)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


@pytest.mark.parametrize("method", METHODS)
def test_init_from_trains_every_methods_adapter_again(method_runs, class_folder, method, tmp_path):
    """peft names the weights of each method its own way (lora_, hada_, lokr_, oft_): all of them train on."""
    first = method_runs[method]
    second = train(tiny_config("classification", class_folder, tmp_path / "again", epochs=1, method=method,
                               init_from=str(first.paths.root)))
    assert second.summary["parameters"]["trainable"] == first.summary["parameters"]["trainable"]
    before = load_file(str(first.paths.model_dir / "adapter_model.safetensors"))
    after = load_file(str(second.paths.model_dir / "adapter_model.safetensors"))
    adapter = [name for name in before if "classifier" not in name]
    assert adapter and before.keys() == after.keys()
    assert all(not torch.equal(before[name], after[name]) for name in adapter), method
