"""Pose end to end, top-down geometry, both formats, metrics and reader errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import VitPoseImageProcessorPil

import visionlora
from tests.conftest import SHARED_DATASETS, assert_nested_close, needs_native_bf16, read_data, tiny_config
from visionlora.cli import main
from visionlora.deploy.predictor import LoadedRun
from visionlora.errors import VisionLoraError
from visionlora.examples.synthetic import POSE_KEYPOINTS, make_pose_dataset
from visionlora.metrics.pose import PoseTarget, pose_metrics
from visionlora.tasks import get_task
from visionlora.tasks.pose.geometry import crop_for_box, decode_heatmaps, encode_heatmaps, warp_matrix, warp_points
from visionlora.tasks.pose.keypoints import flip_pairs, keypoint_sigmas
from visionlora.training.engine import train


@pytest.fixture(scope="module")
def pose_folder(tmp_path_factory) -> Path:
    return make_pose_dataset(tmp_path_factory.mktemp("pose") / "coco", "coco", n_train=12, n_val=4, unlabelled=(2, 1))


@pytest.fixture(scope="module")
def pose_runs(pose_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("pose-runs")
    return {mode: train(tiny_config("pose", pose_folder, root / mode, mode=mode, epochs=2))
            for mode in ("lora", "full")}


def _val_images(folder: Path) -> list[Path]:
    return sorted((folder / "val" / "images").glob("*.png"))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_evaluate_predict_reload_identical_keypoints(pose_runs, pose_folder, mode, tmp_path):
    result = pose_runs[mode]
    images = _val_images(pose_folder)
    boxes = [[[10, 10, 80, 80]], None, [[0, 0, 96, 96], [20, 20, 60, 60]], None]
    trained = LoadedRun(result.paths, get_task("pose"), result.model.eval(), result.processor, result.info)
    before = trained.predict(images, boxes=boxes)
    reloaded = visionlora.load(result.paths.root)
    after = reloaded.predict(images, boxes=boxes)
    assert [len(p["instances"]) for p in after] == [1, 1, 2, 1]
    assert after == before
    assert [k["name"] for k in after[0]["instances"][0]["keypoints"]] == POSE_KEYPOINTS
    for instance in (i for p in after for i in p["instances"]):  # boxes given without scores: the keypoints' mean
        assert instance["score"] == pytest.approx(sum(k["score"] for k in instance["keypoints"]) / len(POSE_KEYPOINTS))

    evaluated = reloaded.evaluate()["metrics"]
    for key in ("pixel_error", "pck@0.1", "oks_ap", "loss"):
        assert evaluated[key] == pytest.approx(result.summary["metrics"][key], abs=1e-5)

    box_file, out, drawn = tmp_path / "boxes.json", tmp_path / "kp.json", tmp_path / "drawn"
    box_file.write_text(json.dumps({images[0].name: [[10, 10, 80, 80]]}))
    assert main(["predict", str(result.paths.root), str(images[0]), "--boxes", str(box_file),
                 "--output", str(out), "--save-images", str(drawn), "--precision", "fp32"]) == 0
    # One image alone is another batch shape than four: oneDNN and OpenBLAS may pick other kernels for
    # it, whose sums round differently (scores differ in the 8th digit on some CPUs).
    assert_nested_close(json.loads(out.read_text())[0]["instances"], after[0]["instances"], 1e-5, rounding=0.01)
    assert (drawn / f"{images[0].stem}.png").is_file()


def test_pose_summary(pose_runs):
    summary = pose_runs["lora"].summary
    assert summary["main_metric"] == "pixel_error"
    assert summary["lora"]["resolved"] == {"target_modules": ["query", "value"], "modules_to_save": ["head"],
                                           "adapted_layers": 4}
    assert set(summary["metrics"]) >= {"pixel_error", "pck@0.05", "pck@0.1", "pck@0.2", "oks_ap",
                                       "mean_baseline_pixel_error"}
    assert summary["data"]["counts"]["labelled_keypoints_train"] == 12 * 4 - 1


def vitpose_fit_error_ratio(tmp_path: Path, seed: int = 0, precision: str = "no") -> float:
    """Pixel error over the mean-position baseline's, of the tiny ViTPose fine-tuned in full on
    8 images and scored on the same images."""
    root = make_pose_dataset(tmp_path / "fit", "coco", n_train=8, n_val=1, seed=seed)
    cfg = tiny_config("pose", root / "train", tmp_path / "run", mode="full", epochs=30, batch_size=4,
                      val_data=str(root / "train"), augment=False, mixed_precision=precision, seed=seed)
    metrics = train(cfg).summary["metrics"]
    return metrics["pixel_error"] / metrics["mean_baseline_pixel_error"]


@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=needs_native_bf16), "no"])
def test_tiny_vitpose_fits_a_handful_of_images(tmp_path, precision):
    # Measured over seeds 0-4 (scripts/test_margins.py): 0.155-0.283, fp32 and bf16, with the detected
    # kernels (AVX-512) and with ATEN_CPU_CAPABILITY=default. The mean position scores 1.
    assert vitpose_fit_error_ratio(tmp_path, precision=precision) < 0.4


def test_decoder_recovers_a_known_point_to_sub_pixel_accuracy():
    point = np.array([[17.3, 9.6]])
    heatmaps, _ = encode_heatmaps(point * (47 / 47), np.ones(1), (48, 64), (48, 64))
    crop = crop_for_box([0, 0, 48, 64], (48, 64))
    matrix = warp_matrix(crop, (48, 64))
    # Undo the crop so the decoded point is compared in heatmap pixels.
    decoded, scores = decode_heatmaps(VitPoseImageProcessorPil(), heatmaps[None], [crop])
    in_heatmap = warp_points(decoded[0], matrix)
    assert np.abs(in_heatmap - point).max() < 0.1 and scores[0, 0] > 0.9


def test_crop_encode_decode_maps_back_to_the_same_pixels():
    rng = np.random.default_rng(0)
    for _ in range(5):
        points = rng.uniform(100, 300, size=(6, 2))
        box = [*points.min(axis=0) - 10, *points.max(axis=0) + 10]
        crop = crop_for_box(box, (192, 256))
        in_input = warp_points(points, warp_matrix(crop, (192, 256)))
        heatmaps, weights = encode_heatmaps(in_input, np.ones(6), (192, 256), (48, 64))
        decoded, _ = decode_heatmaps(VitPoseImageProcessorPil(), heatmaps[None], [crop])
        assert weights.all() and np.abs(decoded[0] - points).max() < 1.0


def test_both_formats_load_to_the_same_records(tmp_path):
    coco = read_data("pose", str(make_pose_dataset(tmp_path / "c", "coco", 6, 2, unlabelled=(3, 2))), None, 0, None)
    dlc = read_data("pose", str(make_pose_dataset(tmp_path / "d", "dlc", 6, 2, unlabelled=(3, 2))), None, 0, 0.25)
    assert coco.labels == dlc.labels == POSE_KEYPOINTS
    assert coco.extra["skeleton"] == dlc.extra["skeleton"] == [[0, 1], [0, 2], [1, 3], [2, 3]]
    by_name = lambda data: {Path(r.image).name: r.instances[0].keypoints for r in data.train + data.val}  # noqa: E731
    from_coco, from_dlc = by_name(coco), by_name(dlc)
    assert set(from_coco) == set(from_dlc) and len(from_coco) == 8
    for name in from_coco:
        assert np.allclose(from_coco[name], from_dlc[name])
    assert from_dlc["frame_003.png"][2, 2] == 0  # the empty DeepLabCut cells are unlabelled


def test_deeplabcut_split_follows_training_fraction(tmp_path):
    project = make_pose_dataset(tmp_path / "d", "dlc", n_train=15, n_val=5)  # TrainingFraction 0.75
    data = read_data("pose", str(project), None, seed=0, val_fraction=None)
    assert (len(data.train), len(data.val)) == (15, 5)
    assert data.description["format"] == "deeplabcut"


def test_flip_pairs_and_sigmas():
    assert flip_pairs(["snout", "leftear", "rightear", "tailbase"]) == [(1, 2)]
    assert flip_pairs(["nose", "left_eye", "right_eye"]) == [(1, 2)]
    assert keypoint_sigmas(["nose", "left_eye", "tailbase"]) == [0.026, 0.025, 0.05]


def test_pose_metrics_by_hand():
    truth = np.array([[10.0, 10.0, 1], [20.0, 20.0, 1], [0.0, 0.0, 0]])
    found = np.array([[[13.0, 14.0], [20.0, 20.0], [50.0, 50.0]]])  # errors 5, 0 and an unlabelled point
    target = PoseTarget(truth, [0, 0, 100, 100], reference_size=100.0, area=10000.0)
    metrics = pose_metrics([target], found, np.ones((1, 3)), ["a", "b", "c"], [0.05] * 3)
    assert metrics["pixel_error"] == pytest.approx(2.5)
    assert metrics["per_keypoint_error"] == {"a": 5.0, "b": 0.0, "c": None}
    assert metrics["pck@0.05"] == 1.0 and metrics["pck@0.1"] == 1.0
    perfect = pose_metrics([target], truth[None, :, :2], np.ones((1, 3)), ["a", "b", "c"], [0.05] * 3)
    assert perfect["oks_ap"] == pytest.approx(1.0) and perfect["pixel_error"] == 0.0


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["annotations"][0].update(keypoints=d["annotations"][0]["keypoints"][:9]),
         r"annotation 1: 9 keypoint values, expected 3 x 4 = 12"),
        (lambda d: d["images"][0].update(file_name="missing.png"), r"image id 1: image 'missing.png' not found"),
        (lambda d: d["categories"][0].update(skeleton=[[1, 9]]),
         r"skeleton entry \[1, 9\] must be two keypoint numbers"),
        (lambda d: d["categories"][0].pop("keypoints"), r"no category names its 'keypoints'"),
    ],
)
def test_coco_keypoint_mistakes_are_clear_errors(tmp_path, edit, message):
    root = make_pose_dataset(tmp_path / "c", "coco", 3, 1)
    path = root / "train" / "annotations.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(VisionLoraError, match=message):
        read_data("pose", str(root), None, 0, None)


def test_nan_and_outside_keypoints_are_unlabelled(tmp_path):
    root = make_pose_dataset(tmp_path / "c", "coco", 3, 1)
    path = root / "train" / "annotations.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["keypoints"][0:3] = [500.0, 10.0, 2]  # outside the 96-pixel image
    data["annotations"][1]["keypoints"][3:6] = [12345.0, 10.0, 2]  # becomes NaN below
    path.write_text(json.dumps(data).replace("12345.0", "NaN"))
    data = read_data("pose", str(root), None, 0, None)
    records = {Path(r.image).name: r.instances[0].keypoints for r in data.train + data.val}
    assert records["frame_000.png"][:, 2].tolist() == [0, 1, 1, 1]
    assert records["frame_001.png"][:, 2].tolist() == [1, 0, 1, 1]


def test_deeplabcut_mistakes_are_clear_errors(tmp_path):
    project = make_pose_dataset(tmp_path / "d", "dlc", 4, 1)
    table = project / "labeled-data" / "video1" / "CollectedData_test.csv"
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines[:3] + [lines[3].replace("frame_000", "frame_999")] + lines[4:]) + "\n")
    with pytest.raises(VisionLoraError,
                       match=r"CollectedData_test.csv:4: image 'labeled-data/video1/frame_999.png' not found"):
        read_data("pose", str(project), None, 0, None)
    import yaml

    config = project / "config.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["bodyparts"].append("paw")
    config.write_text(yaml.safe_dump(settings))
    with pytest.raises(VisionLoraError, match=r"body parts .* differ from config.yaml's .* \(4 vs 5 keypoints\)"):
        read_data("pose", str(project), None, 0, None)


DLC = SHARED_DATASETS / "dlc-openfield"


@pytest.mark.skipif(not DLC.is_dir(), reason="real datasets folder not present")
def test_deeplabcut_openfield_project_trains_end_to_end(tmp_path):
    result = train(tiny_config("pose", DLC, tmp_path / "run", epochs=1, batch_size=16))
    counts = result.summary["data"]["counts"]
    assert counts["train"] + counts["val"] == 116 and counts["val"] == 6  # TrainingFraction 0.95
    evaluated = visionlora.load(result.paths.root).evaluate(batch_size=16)["metrics"]
    for key in ("pixel_error", "mean_baseline_pixel_error"):
        assert evaluated[key] == pytest.approx(result.summary["metrics"][key], rel=1e-5)
