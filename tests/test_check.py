"""``visionlora check``: each planted problem found and named (a leak between training and validation, a broken
file, an out-of-image box, an EXIF-rotated JPEG), every task's own label checks reached, the exit codes, and
``--label-errors`` finding injected classification label errors with a measured precision and recall."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionlora.checking.run import FoldSettings, check
from visionlora.cli import main
from visionlora.data.checks import near_pairs
from visionlora.data.splits import seeded_folds
from visionlora.examples.segmentation import make_segmentation_dataset
from visionlora.examples.synthetic import (
    CLASS_COLOURS,
    make_classification_folder,
    make_detection_dataset,
    make_pose_dataset,
)


def _check(capsys, *args: str) -> tuple[int, list[str], str]:
    code = main(["check", *args, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def _findings(output: Path) -> list[dict]:
    return json.loads((output / "check.json").read_text())["findings"]


@pytest.fixture
def planted(tmp_path) -> Path:
    """A classification set with a training image copied into validation, a broken file and a rotated JPEG."""
    root = make_classification_folder(tmp_path / "data", per_class_train=6, per_class_val=3)
    shutil.copy(root / "train" / "red_disc" / "red_disc_000.png", root / "val" / "red_disc" / "copied.png")
    (root / "train" / "blue_disc" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    turned = Image.open(root / "train" / "green_disc" / "green_disc_001.png").resize((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    turned.save(root / "train" / "green_disc" / "turned.jpg", exif=exif)
    return root


def test_check_finds_each_planted_problem_and_names_its_file(planted, tmp_path, capsys):
    output = tmp_path / "report"
    code, lines, err = _check(capsys, str(planted), "--model", "tiny", "--output", str(output))
    assert code == 1
    by_kind = {f["kind"]: f for f in _findings(output)}
    assert set(by_kind) == {"leak", "unreadable", "exif-rotation"}
    assert by_kind["leak"]["file"].endswith("red_disc_000.png") and by_kind["leak"]["severity"] == "error"
    assert by_kind["leak"]["others"][0].endswith("val/red_disc/copied.png")
    assert by_kind["unreadable"]["file"].endswith("broken.png")
    assert "stored 60x40, used as 40x60" in by_kind["exif-rotation"]["message"]
    assert any(line.startswith("error: ") and "broken.png" in line for line in lines)
    assert any(line.startswith("warning: ") and "turned.jpg" in line for line in lines)
    assert lines[-1].startswith("checked 39 images") and "2 errors, 1 warning" in lines[-1]
    page = (output / "check.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "copied.png" not in page.split("<h2>leak")[0]
    assert "written" in err


def test_a_clean_set_exits_0_and_strict_fails_on_warnings(tmp_path, capsys):
    root = make_classification_folder(tmp_path / "data", per_class_train=5, per_class_val=2)
    code, lines, _ = _check(capsys, str(root), "--model", "tiny", "--output", str(tmp_path / "a"))
    assert code == 0 and lines == [lines[-1]] and "0 errors, 0 warnings" in lines[-1]
    counts = json.loads((tmp_path / "a" / "check.json").read_text())["class_counts"]
    assert counts["train"] == dict.fromkeys(sorted(CLASS_COLOURS), 5)
    assert counts["val"] == dict.fromkeys(sorted(CLASS_COLOURS), 2)
    # 48-pixel images against a 224-pixel input are upscaled: warnings, which fail only with --strict
    assert _check(capsys, str(root), "--output", str(tmp_path / "b"))[0] == 0
    code, lines, _ = _check(capsys, str(root), "--output", str(tmp_path / "c"), "--strict")
    assert code == 1 and all("upscaled" in line or line.startswith("... and") for line in lines[:-1])


def test_a_missing_folder_is_one_line(tmp_path, capsys):
    code, lines, err = _check(capsys, str(tmp_path / "nowhere"))
    assert code == 2 and lines == []
    assert err.strip() == f"error: {tmp_path / 'nowhere'}: no such folder or file"


def test_classification_counts_each_class_and_reports_an_imbalance(tmp_path, capsys):
    root = make_classification_folder(tmp_path / "data", per_class_train=12, per_class_val=2)
    for path in sorted((root / "train" / "red_disc").glob("*.png"))[2:]:
        path.unlink()
    output = tmp_path / "out"
    assert _check(capsys, str(root), "--model", "tiny", "--output", str(output))[0] == 0
    balance = [f for f in _findings(output) if f["kind"] == "class-balance"]
    assert len(balance) == 1 and "train: class imbalance" in balance[0]["message"] and "'red_disc' 2" in \
        balance[0]["message"]


def test_detection_boxes_outside_the_image_or_without_area(tmp_path, capsys):
    root = make_detection_dataset(tmp_path / "data", "coco", n_train=4, n_val=2)
    annotations = root / "train" / "annotations.json"
    coco = json.loads(annotations.read_text())
    del coco["images"][0]["width"], coco["images"][0]["height"]  # the reader cannot clip what it cannot size
    first = next(a for a in coco["annotations"] if a["image_id"] == 1)
    first["bbox"] = [40, 40, 50, 10]  # reaches x = 90 in a 64-pixel image
    second = next(a for a in coco["annotations"] if a["image_id"] == 2)
    second["bbox"] = [5, 5, 0, 10]  # no width
    annotations.write_text(json.dumps(coco))
    output = tmp_path / "out"
    code, lines, _ = _check(capsys, str(root), "--task", "detection", "--model", "tiny", "--output", str(output))
    assert code == 1
    findings = _findings(output)
    outside = [f for f in findings if f["kind"] == "label"]
    assert len(outside) == 1 and outside[0]["file"].endswith("scene_000.png")
    assert "box [40, 40, 90, 50]" in outside[0]["message"]
    assert "reaches outside the 64x64 image" in outside[0]["message"]
    dropped = [f for f in findings if f["kind"] == "annotation-dropped"]
    assert len(dropped) == 1 and "zero-area or invalid box [5, 5, 0, 10]" in dropped[0]["message"]
    assert any("scene_000.png" in line and "reaches outside" in line for line in lines)


def test_pose_keypoints_outside_the_image(tmp_path, capsys):
    root = make_pose_dataset(tmp_path / "data", "coco", n_train=4, n_val=2)
    annotations = root / "train" / "annotations.json"
    coco = json.loads(annotations.read_text())
    del coco["images"][0]["width"], coco["images"][0]["height"]
    coco["annotations"][0]["keypoints"][0] = 500.0  # the snout far right of a 96-pixel image
    annotations.write_text(json.dumps(coco))
    output = tmp_path / "out"
    assert _check(capsys, str(root), "--task", "pose", "--model", "tiny", "--output", str(output))[0] == 1
    (found,) = [f for f in _findings(output) if f["kind"] == "label"]
    assert found["file"].endswith("frame_000.png") and "snout at (500," in found["message"]
    assert "outside the 96x96 image" in found["message"]


def test_segmentation_masks_with_unknown_classes_or_another_size(tmp_path, capsys):
    root = make_segmentation_dataset(tmp_path / "data", n_train=4, n_val=2, size=32)
    masks = root / "train" / "masks"
    Image.fromarray(np.full((32, 32), 7, dtype=np.uint8), mode="L").save(masks / "train_000.png")
    Image.fromarray(np.zeros((16, 32), dtype=np.uint8), mode="L").save(masks / "train_001.png")
    output = tmp_path / "out"
    assert _check(capsys, str(root), "--task", "segmentation", "--model", "tiny", "--output", str(output))[0] == 1
    found = sorted((f["file"], f["message"]) for f in _findings(output) if f["kind"] == "label")
    assert len(found) == 2
    assert found[0][0].endswith("train_000.png") and "class id 7 outside the 3 classes" in found[0][1]
    assert found[1][0].endswith("train_001.png") and "mask is 32x16 pixels but its image" in found[1][1]


def test_near_duplicates_are_found_and_distinct_images_are_not(tmp_path, capsys):
    root = make_classification_folder(tmp_path / "data", per_class_train=30, per_class_val=10)
    source = root / "train" / "blue_disc" / "blue_disc_004.png"
    Image.open(source).resize((96, 96)).save(root / "train" / "blue_disc" / "bigger.jpg", quality=80)
    output = tmp_path / "out"
    assert _check(capsys, str(root), "--model", "tiny", "--output", str(output))[0] == 0
    (found,) = _findings(output)
    assert found["kind"] == "duplicate" and "near-duplicate image in train" in found["message"]
    assert {Path(found["file"]).name, Path(found["others"][0]).name} == {"blue_disc_004.png", "bigger.jpg"}


def test_near_pairs_and_folds():
    hashes = [bytes(32), bytes([0b111]) + bytes(31), b"\xff" * 32, bytes([1]) + bytes(31)]
    assert list(near_pairs(hashes, 3)) == [(0, 1), (0, 3), (1, 3)]
    items = [("a" if i < 10 else "b", i) for i in range(25)]
    folds = seeded_folds(items, 5, seed=1, group=lambda item: item[0])
    assert sorted(folds.count(k) for k in range(5)) == [5] * 5
    assert all(sum(1 for item, f in zip(items, folds) if f == k and item[0] == "a") == 2 for k in range(5))
    assert folds == seeded_folds(items, 5, seed=1, group=lambda item: item[0]) != seeded_folds(items, 5, seed=2)


def test_fold_setting_is_checked(capsys):
    assert main(["train", "--data", "x", "--fold", "6/5"]) == 2
    assert "--fold 6/5: needs 2 or more folds and a fold from 1 to 5" in capsys.readouterr().err


# -- label errors --------------------------------------------------------------------------------------
def flip_labels(root: Path, share: float, seed: int) -> set[str]:
    """Move ``share`` of the images into another class's folder (keeping two in each); the moved paths."""
    rng = random.Random(seed)
    files = sorted(root.rglob("*.png"))
    left = {folder: sum(f.parent == folder for f in files) for folder in {f.parent for f in files}}
    moved = set()
    for path in rng.sample(files, round(len(files) * share)):
        if left[path.parent] <= 2:
            continue
        left[path.parent] -= 1
        other = rng.choice([name for name in CLASS_COLOURS if name != path.parent.name])
        target = path.parent.parent / other / f"flipped_{path.name}"
        shutil.move(path, target)
        moved.add(str(target))
    return moved


def label_error_precision_recall(tmp: Path, seed: int, per_class: int = 12, folds: int = 4,
                                 epochs: int = 4) -> dict[str, float]:
    """Precision and recall of ``--label-errors`` on generated images (4 classes, ``per_class`` training and a
    quarter as many validation images each) with 10% of the labels flipped: ``folds`` runs of the pretrained
    tiny ViT, ``epochs`` each, trained packed."""
    root = make_classification_folder(tmp / "data", per_class_train=per_class, per_class_val=per_class // 4,
                                      seed=seed)
    planted = flip_labels(root, 0.1, seed)
    settings = FoldSettings(folds, epochs, seed, {"lr": 3e-3, "batch_size": 8, "mixed_precision": "no"})
    result, _, _ = check(str(root), "classification", model="tiny-pretrained", output=str(tmp / "out"),
                         progress=False, folds=settings, say=lambda line: None)
    flagged = {f.file for f in result.findings if f.kind == "label-error"}
    found = len(flagged & planted)
    return {"precision": found / max(1, len(flagged)), "recall": found / len(planted)}


def test_label_errors_finds_flipped_classification_labels(tmp_path):
    # 60 images, 6 flipped: measured over seeds 0-4 (scripts/test_margins.py --only label-errors), precision
    # 0.67-1.00 and recall 0.33-0.83 (seed 0: 1.00 and 0.40); a flagged image that was not flipped costs 1/3 of
    # the precision at most, and one flipped image 1/6 of the recall
    scores = label_error_precision_recall(tmp_path, seed=0)
    assert scores["precision"] >= 0.6
    assert scores["recall"] >= 0.3
    page = (tmp_path / "out" / "check.html").read_text()
    assert "Likely label errors" in page and "predicted (out of sample)" in page
    errors = [f for f in _findings(tmp_path / "out") if f["kind"] == "label-error"]
    assert errors and errors[0]["given"]["label"] != errors[0]["predicted"]["label"]
    assert [f["score"] for f in errors] == sorted(f["score"] for f in errors)


# -- each task's label score, on predictions made up to agree or disagree --------------------------------------
def _info(task_name: str, labels: list[str]):
    from visionlora.tasks import get_task
    from visionlora.tasks.base import ModelInfo

    task = get_task(task_name)
    return task, ModelInfo(task_name, "lora", "tiny", labels, {"height": 32, "width": 32}, state=task.state_type())


def test_detection_label_issues_flag_a_shifted_box():
    from visionlora.data.records import DetectionRecord

    task, info = _info("detection", ["red_box", "blue_box"])
    rng = np.random.default_rng(0)
    records, predictions = [], []
    for index in range(12):
        x, y = (float(v) for v in rng.integers(0, 30, 2))
        box = [x, y, x + 20, y + 16]
        given = [x + 30, y + 30, x + 50, y + 46] if index == 5 else box  # the label drawn beside the object
        records.append(DetectionRecord(f"scene_{index}.png", [given], ["red_box"]))
        predictions.append({"boxes": [{"label": "red_box", "score": 0.95, "box": box}]})
    issues = task.report.label_issues(records, predictions, info)
    assert [i for i, issue in enumerate(issues) if issue.flagged] == [5]
    assert min(range(12), key=lambda i: issues[i].score) == 5


def test_pose_label_issues_flag_a_keypoint_far_from_its_prediction():
    from visionlora.data.records import PoseInstance, PoseRecord

    task, info = _info("pose", ["snout", "tail"])
    records, predictions = [], []
    for index in range(3):
        points = np.array([[20.0, 30.0, 1.0], [70.0, 60.0, 1.0]])
        predicted = points.copy()
        predicted[0, :2] += [40, 0] if index == 1 else [2, -1]  # 40 px off in a 96 x 96 box
        records.append(PoseRecord(f"frame_{index}.png", [PoseInstance(points)]))
        predictions.append({"instances": [{"box": [0, 0, 96, 96], "keypoints": [
            {"name": name, "x": x, "y": y, "score": 0.9} for name, (x, y, _) in zip(info.labels, predicted)]}]})
    issues = task.report.label_issues(records, predictions, info)
    assert [issue.flagged for issue in issues] == [False, True, False]
    assert "snout labelled at (20, 30), predicted at (60, 30)" in issues[1].message
    assert issues[1].score == pytest.approx(1 - 40 / np.hypot(96, 96))


def test_segmentation_mask_issue_is_the_mean_iou():
    from visionlora.tasks.segmentation.task import mask_issue

    given = np.zeros((10, 10), dtype=np.uint8)
    given[:5] = 1
    assert mask_issue(given, given.copy(), ["background", "disc"], 255).flagged is False
    shifted = np.zeros_like(given)
    shifted[3:9] = 1  # the disc: rows 3-4 of 0-8 shared (2/9); the background: row 9 of 0-2 and 5-9 (1/8)
    issue = mask_issue(given, shifted, ["background", "disc"], 255)
    assert issue.flagged and issue.score == pytest.approx((2 / 9 + 1 / 8) / 2)
    assert "worst: background, IoU 0.12" in issue.message


def test_an_annotation_naming_a_missing_image_is_reported_and_the_other_parts_checked(tmp_path, capsys):
    root = make_detection_dataset(tmp_path / "data", "coco", n_train=4, n_val=2)
    (root / "val" / "images" / "scene_001.png").unlink()
    output = tmp_path / "out"
    code, lines, _ = _check(capsys, str(root), "--task", "detection", "--model", "tiny", "--output", str(output))
    assert code == 1
    (found,) = _findings(output)
    assert found["kind"] == "annotations" and found["split"] == "val"
    assert "image 'scene_001.png' not found" in found["message"]
    assert lines[-1].startswith("checked 4 images")
