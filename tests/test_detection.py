"""Detection end to end, the three annotation formats, COCO metrics and reader errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

import visionlora
from tests.conftest import SHARED_DATASETS, needs_native_bf16, read_data, tiny_config
from tests.readme import run_snippet
from visionlora.cli import main
from visionlora.deploy.predictor import LoadedRun
from visionlora.errors import VisionLoraError
from visionlora.examples.synthetic import DETECTION_FORMATS, make_detection_dataset
from visionlora.metrics.detection import ImageBoxes, coco_detections, coco_ground_truth, detection_metrics
from visionlora.tasks import get_task
from visionlora.training.engine import train

DETECTION = get_task("detection")


@pytest.fixture(scope="module")
def boxes_folder(tmp_path_factory) -> Path:
    return make_detection_dataset(tmp_path_factory.mktemp("det") / "coco", "coco", n_train=12, n_val=4)


@pytest.fixture(scope="module")
def detection_runs(boxes_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("det-runs")
    runs = {
        mode: train(tiny_config("detection", boxes_folder, root / mode, mode=mode, epochs=2))
        for mode in ("lora", "full")
    }
    runs["rtdetr-lora"] = train(tiny_config("detection", boxes_folder, root / "rt", model="tiny-rtdetr", epochs=2))
    return runs


def _val_images(folder: Path) -> list[Path]:
    return sorted((folder / "val" / "images").glob("*.png"))


@pytest.mark.parametrize("mode", ["lora", "full", "rtdetr-lora"])
def test_train_evaluate_predict_reload_identical_boxes(detection_runs, boxes_folder, mode, tmp_path):
    result = detection_runs[mode]
    images = _val_images(boxes_folder)
    trained = LoadedRun(result.paths, get_task("detection"), result.model.eval(), result.processor, result.info)
    before = trained.predict(images, threshold=0.0)
    reloaded = visionlora.load(result.paths.root)
    after = reloaded.predict(images, threshold=0.0)
    assert len(after) == len(images) and all(p["boxes"] for p in after)
    for a, b in zip(before, after):
        assert [x["label"] for x in a["boxes"]] == [x["label"] for x in b["boxes"]]
        assert torch.allclose(torch.tensor([x["box"] for x in a["boxes"]]),
                              torch.tensor([x["box"] for x in b["boxes"]]), atol=0.02)
        assert [x["score"] for x in a["boxes"]] == pytest.approx([x["score"] for x in b["boxes"]], abs=1e-5)

    evaluated = reloaded.evaluate()["metrics"]
    for key in ("map", "map50", "loss"):
        assert evaluated[key] == pytest.approx(result.summary["metrics"][key], abs=1e-6)

    out, drawings = tmp_path / "boxes.json", tmp_path / "drawn"
    assert main(["predict", str(result.paths.root), str(images[0]), "--threshold", "0", "--output", str(out),
                 "--save-images", str(drawings), "--precision", "fp32"]) == 0
    from_cli = json.loads(out.read_text())
    assert [b["label"] for b in from_cli[0]["boxes"]] == [b["label"] for b in after[0]["boxes"]]
    assert [b["score"] for b in from_cli[0]["boxes"]] == pytest.approx([b["score"] for b in after[0]["boxes"]],
                                                                      abs=1e-5)
    assert (drawings / f"{images[0].stem}.png").is_file()


def test_detection_summary(detection_runs):
    summary = detection_runs["lora"].summary
    assert summary["main_metric"] == "map"
    assert summary["lora"]["resolved"]["target_modules"] == ["q_proj", "v_proj"]
    assert summary["lora"]["resolved"]["modules_to_save"] == ["class_labels_classifier", "bbox_predictor"]
    assert set(summary["metrics"]) >= {"map", "map50", "map75", "ar100", "per_class_ap", "loss"}
    assert set(summary["metrics"]["per_class_ap"]) == {"red_box", "blue_box"}
    assert summary["data"]["counts"]["train"] == 12 and summary["data"]["counts"]["val"] == 4


def test_rtdetr_heads_are_the_decoders_own(detection_runs):
    resolved = detection_runs["rtdetr-lora"].summary["lora"]["resolved"]
    assert resolved["modules_to_save"] == [
        "model.denoising_class_embed", "model.enc_score_head", "model.enc_bbox_head",
        "model.decoder.class_embed.0", "model.decoder.class_embed.1",
        "model.decoder.bbox_embed.0", "model.decoder.bbox_embed.1",
    ]


def test_readme_snippet_loads_a_detection_adapter(detection_runs, boxes_folder, capsys):
    run_dir = detection_runs["lora"].paths.root
    image = _val_images(boxes_folder)[0]
    namespace = run_snippet("load-snippet-detection", {
        "runs/detection/lora": str(run_dir), "photo.jpg": str(image), "threshold=0.5": "threshold=0.0",
    })
    expected = visionlora.load(run_dir).predict([image], threshold=0.0)[0]["boxes"]
    scores = sorted(namespace["found"]["scores"].tolist(), reverse=True)
    assert scores == pytest.approx([b["score"] for b in expected], abs=1e-5)


def test_the_three_formats_read_to_the_same_records(tmp_path):
    read = {}
    for fmt in DETECTION_FORMATS:
        root = make_detection_dataset(tmp_path / fmt, fmt, n_train=5, n_val=2, seed=7)
        data = read_data("detection", str(root), None, seed=0, val_fraction=0.2)
        read[fmt] = [(Path(r.image).name, r.labels, r.boxes) for r in data.train + data.val]
        assert data.description["format"] == fmt
    for fmt in ("voc", "yolo"):
        assert [(n, labels) for n, labels, _ in read[fmt]] == [(n, labels) for n, labels, _ in read["coco"]]
        for (_, _, a), (_, _, b) in zip(read[fmt], read["coco"]):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


def test_a_coco_file_path_and_a_seeded_split(tmp_path):
    root = make_detection_dataset(tmp_path / "c", "coco", n_train=10, n_val=0)
    data = read_data("detection", str(root / "train" / "annotations.json"), None, seed=1, val_fraction=0.2)
    assert len(data.train) == 8 and len(data.val) == 2


def detector_fit_map50(tmp_path: Path, seed: int = 0, precision: str = "no") -> float:
    """mAP50 of tiny RT-DETRv2 (the detector recommended for small data; DETR needs many times
    more epochs) fine-tuned in full on 8 one-box images and scored on the same images."""
    root = make_detection_dataset(tmp_path / "fit", "coco", n_train=8, n_val=1, max_objects=1, seed=seed)
    cfg = tiny_config("detection", root / "train", tmp_path / "run", mode="full", model="tiny-rtdetr", epochs=60,
                      batch_size=4, val_data=str(root / "train"), augment=False, warmup_ratio=0.05,
                      mixed_precision=precision, seed=seed)
    return train(cfg).summary["metrics"]["map50"]


@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=needs_native_bf16), "no"])
def test_tiny_detector_fits_a_handful_of_images(tmp_path, precision):
    # Random boxes score about 0. Measured over seeds 0-4 (scripts/test_margins.py), fp32: 0.485-0.832 with
    # the detected kernels (AVX-512), 0.543-0.834 with ATEN_CPU_CAPABILITY=default; bf16: 0.463-0.958, 0.505-0.752.
    assert detector_fit_map50(tmp_path, precision=precision) > 0.3


def test_our_map_equals_pycocotools_cocoeval():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    generator = torch.Generator().manual_seed(0)
    targets, predictions, sizes = [], [], []
    for _ in range(6):
        corner = torch.rand(3, 2, generator=generator) * 60
        boxes = torch.cat([corner, corner + 10 + torch.rand(3, 2, generator=generator) * 30], dim=1)
        labels = torch.randint(0, 2, (3,), generator=generator)
        noisy = boxes + torch.randn(3, 4, generator=generator) * 3
        targets.append(ImageBoxes(boxes.tolist(), labels.tolist()))
        predictions.append(ImageBoxes(noisy.tolist(), labels.tolist(), torch.rand(3, generator=generator).tolist()))
        sizes.append((100, 100))
    ours = detection_metrics(targets, predictions, ["a", "b"], sizes)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_ground_truth(targets, ["a", "b"], sizes)
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(coco_detections(predictions)), "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    assert ours["map"] == pytest.approx(evaluation.stats[0])
    assert ours["map50"] == pytest.approx(evaluation.stats[1])
    assert ours["map75"] == pytest.approx(evaluation.stats[2])
    assert ours["ar100"] == pytest.approx(evaluation.stats[8])
    assert 0.1 < ours["map"] < 1.0


def test_perfect_predictions_score_one():
    targets = [ImageBoxes([[10, 10, 50, 40]], [0]), ImageBoxes([[5, 5, 20, 30], [30, 30, 60, 60]], [1, 0])]
    predictions = [ImageBoxes(t.boxes, t.labels, [0.9] * len(t.boxes)) for t in targets]
    metrics = detection_metrics(targets, predictions, ["a", "b"], [(64, 64), (64, 64)])
    assert metrics["map"] == pytest.approx(1.0) and metrics["per_class_ap"] == {"a": pytest.approx(1.0),
                                                                                "b": pytest.approx(1.0)}


# -- reader errors and repairs -----------------------------------------------------------
def _coco(tmp_path: Path, images, annotations, categories=({"id": 1, "name": "thing"},)) -> Path:
    folder = tmp_path / "split"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for entry in images:
        if not entry.get("missing"):
            Image.new("RGB", (entry.get("width", 64), entry.get("height", 48))).save(
                folder / "images" / entry["file_name"])
    data = {"images": [{k: v for k, v in e.items() if k != "missing"} for e in images],
            "annotations": list(annotations), "categories": list(categories)}
    (folder / "annotations.json").write_text(json.dumps(data))
    return folder


def test_boxes_are_clipped_dropped_and_negatives_kept(tmp_path):
    folder = _coco(tmp_path, [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                              {"id": 2, "file_name": "empty.png", "width": 64, "height": 48}], [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [-10, 5, 30, 20]},   # partly outside: clipped
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5]},     # zero width: dropped
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [10, 10, -4, 5]},    # negative: dropped
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [70, 50, 10, 10]},   # wholly outside: dropped
    ])
    split = DETECTION.data.read_part(folder)
    by_name = {Path(r.image).name: r for r in split.records}
    assert by_name["a.png"].boxes == [[0.0, 5.0, 20.0, 25.0]]
    assert by_name["empty.png"].boxes == []
    assert len(split.dropped) == 3 and "annotation 2" in split.dropped[0]["annotation"]


@pytest.mark.parametrize(
    "images, annotations, message",
    [
        ([{"id": 1, "file_name": "gone.png", "missing": True}], [], r"image id 1: image 'gone.png' not found"),
        ([{"id": 1, "file_name": "a.png"}], [{"id": 9, "image_id": 1, "category_id": 5, "bbox": [0, 0, 5, 5]}],
         r"annotation 9 has unknown category_id 5 \(known: 1\)"),
        ([{"id": 1, "file_name": "a.png"}], [{"id": 9, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5]}],
         r"annotation 9 points to image id 2, which is not in 'images'"),
        ([{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}], [], r"image id 1 appears more than once"),
        ([{"id": 1, "file_name": "../../outside.png", "missing": True}], [], r"points outside the dataset folder"),
        ([{"id": 1, "file_name": "a.png"}], [{"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5]}],
         r"annotation 3: 'bbox' must be 4 numbers"),
    ],
)
def test_coco_mistakes_are_clear_errors(tmp_path, images, annotations, message):
    folder = _coco(tmp_path, images, annotations)
    with pytest.raises(VisionLoraError, match=message) as info:
        DETECTION.data.read_part(folder)
    assert "annotations.json" in str(info.value)


def test_voc_and_yolo_mistakes_are_clear_errors(tmp_path):
    voc = make_detection_dataset(tmp_path / "voc", "voc", n_train=2, n_val=1)
    xml = next((voc / "train" / "annotations").glob("*.xml"))
    xml.write_text(xml.read_text().replace("<xmin>", "<xmin>abc"))
    with pytest.raises(VisionLoraError, match=r"object 1: <bndbox><xmin> is 'abc"):
        DETECTION.data.read_part(voc / "train")
    yolo = make_detection_dataset(tmp_path / "yolo", "yolo", n_train=2, n_val=1)
    label = next((yolo / "train" / "labels").glob("*.txt"))
    label.write_text("7 0.5 0.5 0.2 0.2\n")
    with pytest.raises(VisionLoraError, match=r":1: class 7 is not in the 2 class names"):
        DETECTION.data.read_part(yolo / "train")
    (yolo / "train" / "labels" / "stray.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(VisionLoraError, match=r"stray.txt: no image named stray"):
        DETECTION.data.read_part(yolo / "train")


def test_a_folder_without_annotations_is_a_clear_error(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(VisionLoraError, match="no annotations found"):
        DETECTION.data.read_part(tmp_path / "photos")


RACCOON = SHARED_DATASETS / "raccoon"


@pytest.mark.skipif(not RACCOON.is_dir(), reason="real datasets folder not present")
def test_raccoon_voc_photos_train_end_to_end(tmp_path):
    result = train(tiny_config("detection", RACCOON, tmp_path / "run", epochs=1, batch_size=8))
    counts = result.summary["data"]["counts"]
    assert counts["train"] == 160 and counts["val"] == 40
    assert counts["train_boxes"] + counts["val_boxes"] == 217
    # in batches of 8 as in training: the photos differ in size, and a batch pads them to its largest
    evaluated = visionlora.load(result.paths.root).evaluate(batch_size=8)["metrics"]
    assert evaluated["map"] == pytest.approx(result.summary["metrics"]["map"], abs=1e-6)


def test_a_timm_backbone_visionlora_cannot_convert_is_a_clear_error(tmp_path):
    import importlib.util

    from transformers import DetrConfig

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here")
    DetrConfig(use_timm_backbone=True, backbone="efficientnet_b0",
               use_pretrained_backbone=False).save_pretrained(tmp_path)
    with pytest.raises(VisionLoraError, match="needs timm .pip install timm.; without timm, visionlora loads DETR"):
        get_task("detection").model.checkpoint(str(tmp_path))
