"""Semantic segmentation end to end: train, evaluate, predict, reload, the outputs, a fit test,
a Pascal VOC folder and the offline hub-id path."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visionlora
from tests.conftest import fill_hub_cache, tiny_config
from visionlora.cli import main
from visionlora.deploy.predictor import LoadedRun
from visionlora.examples.segmentation import SEGMENTATION_CLASSES, make_segmentation_dataset
from visionlora.tasks import get_task
from visionlora.training.engine import train

TASK = "segmentation"


@pytest.fixture(scope="module")
def mask_folder(tmp_path_factory) -> Path:
    return make_segmentation_dataset(tmp_path_factory.mktemp("seg") / "shapes", n_train=12, n_val=4, size=32)


@pytest.fixture(scope="module")
def seg_runs(mask_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("seg-runs")
    return {mode: train(tiny_config(TASK, mask_folder, root / mode, mode=mode, epochs=2, image_size=32))
            for mode in ("lora", "full")}


def _val_images(folder: Path) -> list[Path]:
    return sorted((folder / "val" / "images").glob("*.png"))


def _mask(prediction: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["mask"]))))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_evaluate_predict_reload_identical_masks(seg_runs, mask_folder, mode, tmp_path, capsys):
    result = seg_runs[mode]
    images = _val_images(mask_folder)
    trained = LoadedRun(result.paths, get_task(TASK), result.model.eval(), result.processor, result.info)
    before = trained.predict(images)
    reloaded = visionlora.load(result.paths.root)
    after = reloaded.predict(images)
    assert after == before
    for path, prediction in zip(images, after):
        mask = _mask(prediction)
        assert mask.shape == Image.open(path).size[::-1]  # upsampled to the image's own size
        assert sum(prediction["areas"].values()) == mask.size
        assert set(prediction["areas"]) <= set(SEGMENTATION_CLASSES)
        assert prediction["areas"] == {SEGMENTATION_CLASSES[i]: int(n) for i, n in
                                       enumerate(np.bincount(mask.ravel(), minlength=3)) if n}

    evaluated = reloaded.evaluate()["metrics"]
    for key in ("mean_iou", "pixel_accuracy", "mean_accuracy", "loss"):
        assert evaluated[key] == pytest.approx(result.summary["metrics"][key], abs=1e-6)
    assert set(evaluated["per_class_iou"]) == set(SEGMENTATION_CLASSES)

    out, drawn, masks = tmp_path / "pred.json", tmp_path / "drawn", tmp_path / "masks"
    assert main(["predict", str(result.paths.root), *map(str, images), "--output", str(out),
                 "--save-images", str(drawn), "--save-masks", str(masks), "--precision", "fp32"]) == 0
    from_cli = json.loads(out.read_text())
    assert [{k: v for k, v in p.items() if k != "image"} for p in from_cli] == after
    for path, prediction in zip(images, after):
        saved = Image.open(masks / f"{path.stem}.png")
        assert saved.mode == "P" and np.array_equal(np.asarray(saved), _mask(prediction))
        assert Image.open(drawn / f"{path.stem}.png").size == Image.open(path).size
    run_files = {p.name for p in (result.paths.root / f"training_results{'_lora' if mode == 'lora' else ''}").iterdir()}
    assert {"per_class.csv", "confusion_matrix.png", "class_iou.png", "report.html"} <= run_files


def fit_mean_iou(root: Path, seed: int = 0) -> float:
    """Validation mean IoU of the tiny SegFormer trained fully on discs and squares."""
    data = make_segmentation_dataset(root / "data", n_train=48, n_val=12, size=64, seed=seed)
    cfg = tiny_config(TASK, data, root / "run", mode="full", epochs=25, lr=3e-3, seed=seed)
    return train(cfg).summary["metrics"]["mean_iou"]


def test_a_tiny_model_learns_to_separate_two_shapes(tmp_path):
    # all background scores 0.27; measured over seeds 0-4 (scripts/test_margins.py): 0.866-0.916
    assert fit_mean_iou(tmp_path) > 0.7


def test_a_voc_folder_trains_with_its_own_validation_list(tmp_path, capsys):
    voc = make_segmentation_dataset(tmp_path / "voc", fmt="voc", n_train=8, n_val=3, size=32)
    assert main(["train", "--task", TASK, "--data", str(voc), "--model", "tiny", "--image-size", "32",
                 "--epochs", "1", "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "training_results_lora" / "training_summary.json").read_text())
    assert summary["data"]["counts"]["train"] == 8 and summary["data"]["counts"]["val"] == 3
    assert summary["data"]["format"] == "voc-segmentation"


def test_the_preset_hub_id_trains_offline_from_the_cache(mask_folder, tmp_path):
    """nvidia/mit-b0 loads through the Hugging Face cache as a download would, with HF_HUB_OFFLINE=1."""
    from visionlora.tasks.segmentation.builtin import tiny_segformer

    home = tmp_path / "hf"
    model, processor = tiny_segformer(["a", "b"], 32)  # another head size: rebuilt for the data's classes
    fill_hub_cache(home, "nvidia/mit-b0", model, processor)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "visionlora", "train", "--task", TASK, "--data", str(mask_folder),
                           "--epochs", "1", "--output", str(tmp_path / "run"), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "run" / "trained_model_lora" / "visionlora.json").read_text())
    assert info["base_model"] == "nvidia/mit-b0" and info["labels"] == SEGMENTATION_CLASSES
    reloaded = subprocess.run([sys.executable, "-m", "visionlora", "predict", str(tmp_path / "run"),
                               str(_val_images(mask_folder)[0])], env=env, capture_output=True, text=True, timeout=300)
    assert reloaded.returncode == 0, reloaded.stderr
    assert set(json.loads(reloaded.stdout)[0]["areas"]) <= set(SEGMENTATION_CLASSES)


def test_bad_segmentation_data_is_one_line(mask_folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    make_segmentation_dataset(broken, n_train=4, n_val=2, size=32)
    Image.new("L", (20, 20)).save(broken / "train" / "masks" / "train_001.png")
    assert main(["train", "--task", TASK, "--data", str(broken), "--model", "tiny", "--epochs", "1",
                 "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "train_001.png" in lines[0] and "20x20" in lines[0], lines
    assert not (tmp_path / "run" / "trained_model_lora").exists()


def test_another_architecture_trains_every_module_beside_its_backbone(mask_folder, tmp_path):
    """Any AutoModelForSemanticSegmentation: a BEiT with an FPN, a decode and an auxiliary head."""
    from transformers import BeitConfig, BeitForSemanticSegmentation, BeitImageProcessorPil

    config = BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, out_indices=[1, 2, 3, 4], use_auxiliary_head=True, pool_scales=[1, 2],
                        auxiliary_channels=16, num_labels=3)
    BeitForSemanticSegmentation(config).save_pretrained(tmp_path / "beit")
    BeitImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(tmp_path / "beit")
    result = train(tiny_config(TASK, mask_folder, tmp_path / "run", model=str(tmp_path / "beit"), epochs=1))
    assert result.summary["lora"]["resolved"]["modules_to_save"] == ["fpn", "decode_head", "auxiliary_head"]
    images = _val_images(mask_folder)
    assert visionlora.load(result.paths.root).predict(images) == LoadedRun(
        result.paths, get_task(TASK), result.model.eval(), result.processor, result.info).predict(images)
