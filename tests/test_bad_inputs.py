"""The bad-input matrix: each kind of bad input gives one clear line (exit 2) or a counted skip.

Every error row also checks that no traceback is printed and nothing half-written is left.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionlora.cli import main
from visionlora.examples.synthetic import make_classification_folder, make_detection_dataset, make_pose_dataset


# -- builders: each returns (argv, expected) for one row -----------------------------------
def _classes(tmp: Path, classes=("red_disc", "blue_disc")) -> Path:
    return make_classification_folder(tmp / "data", per_class_train=4, per_class_val=2, classes=list(classes))


def _train(data: Path, tmp: Path, task="classification", *extra) -> list[str]:
    return ["train", "--task", task, "--data", str(data), "--model", "tiny", "--epochs", "1", "--lr", "1e-3",
            "--no-progress", "--output", str(tmp / "run"), *extra]


def _jpeg(size=(40, 30), mode="RGB", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else (0, 200, 200, 0)).save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def truncated_jpeg(tmp):
    data = _classes(tmp)
    (data / "train" / "red_disc" / "cut.jpg").write_bytes(_jpeg((200, 200))[:400])
    return _train(data, tmp), ("skip", "cut.jpg", "cannot decode")


def zero_byte_file(tmp):
    data = _classes(tmp)
    (data / "train" / "red_disc" / "empty.jpg").write_bytes(b"")
    return _train(data, tmp), ("skip", "empty.jpg", "not a readable image")


def text_named_jpg(tmp):
    data = _classes(tmp)
    (data / "train" / "red_disc" / "notes.jpg").write_text("shopping list")
    return _train(data, tmp), ("skip", "notes.jpg", "not a readable image")


def decompression_bomb(tmp):
    data = _classes(tmp)
    Image.new("L", (13000, 14000)).save(data / "train" / "red_disc" / "bomb.png", optimize=True)  # 182 MP > limit
    return _train(data, tmp), ("skip", "bomb.png", "pixel limit")


def cmyk_jpeg(tmp):
    data = _classes(tmp)
    (data / "train" / "red_disc" / "print.jpg").write_bytes(_jpeg(mode="CMYK"))
    return _train(data, tmp), ("ok", "train", 9)


def png_16bit(tmp):
    data = _classes(tmp)
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(data / "train" / "red_disc" / "deep.png")
    return _train(data, tmp), ("ok", "train", 9)


def _rotated_png(path: Path, raw_size=(60, 30)) -> None:
    """Stored 60 wide x 30 high, shown (EXIF orientation 6) 30 wide x 60 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", raw_size, (120, 120, 120)).save(path, exif=exif)


def exif_rotated_boxes(tmp):
    root = make_detection_dataset(tmp / "data", "coco", n_train=4, n_val=2)
    split = root / "train"
    _rotated_png(split / "images" / "scene_000.png")
    coco = json.loads((split / "annotations.json").read_text())
    coco["images"][0].update(width=30, height=60)
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 1]
    coco["annotations"].append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [5, 40, 20, 15], "iscrowd": 0})
    (split / "annotations.json").write_text(json.dumps(coco))
    return _train(root, tmp, "detection"), ("ok", "dropped_boxes", 0)  # y 40..55 fits the shown 60-pixel height


def exif_rotated_keypoints(tmp):
    root = make_pose_dataset(tmp / "data", "coco", n_train=4, n_val=2)
    split = root / "train"
    _rotated_png(split / "images" / "frame_000.png", raw_size=(96, 48))
    coco = json.loads((split / "annotations.json").read_text())
    coco["images"][0].update(width=48, height=96)
    coco["annotations"][0].update(keypoints=[10, 80, 2, 20, 70, 2, 30, 70, 2, 25, 90, 2], bbox=[5, 60, 30, 35])
    (split / "annotations.json").write_text(json.dumps(coco))
    return _train(root, tmp, "pose"), ("ok", "labelled_keypoints_train", 16)  # y > 48 is inside the shown image


def _coco_edit(tmp, edit, task="detection"):
    maker = make_detection_dataset if task == "detection" else make_pose_dataset
    root = maker(tmp / "data", "coco", n_train=4, n_val=2)
    path = root / "train" / "annotations.json"
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco).replace("12345.5", "NaN"))
    return root


def missing_image(tmp):
    root = _coco_edit(tmp, lambda c: c["images"][0].update(file_name="gone.png"))
    return _train(root, tmp, "detection"), ("error", "annotations.json: image id 1: image 'gone.png' not found")


def negative_box(tmp):
    root = _coco_edit(tmp, lambda c: c["annotations"][0].update(bbox=[10, 10, -5, 8]))
    return _train(root, tmp, "detection"), ("ok", "dropped_boxes", 1)


def out_of_image_box(tmp):
    root = _coco_edit(tmp, lambda c: c["annotations"][0].update(bbox=[200, 200, 10, 10]))
    return _train(root, tmp, "detection"), ("ok", "dropped_boxes", 1)


def zero_area_box(tmp):
    root = _coco_edit(tmp, lambda c: c["annotations"][0].update(bbox=[10, 10, 0, 8]))
    return _train(root, tmp, "detection"), ("ok", "dropped_boxes", 1)


def nan_box(tmp):
    root = _coco_edit(tmp, lambda c: c["annotations"][0].update(bbox=[12345.5, 10, 5, 8]))
    return _train(root, tmp, "detection"), ("ok", "dropped_boxes", 1)


def unknown_category(tmp):
    root = _coco_edit(tmp, lambda c: c["annotations"][0].update(category_id=42))
    return _train(root, tmp, "detection"), ("error", "has unknown category_id 42 (known: 1, 2)")


def duplicate_image_ids(tmp):
    root = _coco_edit(tmp, lambda c: c["images"][1].update(id=1))
    return _train(root, tmp, "detection"), ("error", "image id 1 appears more than once")


def path_outside_dataset(tmp):
    root = _coco_edit(tmp, lambda c: c["images"][0].update(file_name="../../../etc/passwd"))
    return _train(root, tmp, "detection"), ("error", "points outside the dataset folder")


def keypoint_count_mismatch(tmp):
    root = _coco_edit(tmp, lambda c: c["annotations"][0]["keypoints"].extend([1, 2, 2]), task="pose")
    return _train(root, tmp, "pose"), ("error", "annotation 1: 15 keypoint values, expected 3 x 4 = 12")


def nan_keypoints(tmp):
    root = _coco_edit(tmp, lambda c: c["annotations"][0]["keypoints"].__setitem__(0, 12345.5), task="pose")
    return _train(root, tmp, "pose"), ("ok", "labelled_keypoints_train", 15)


def empty_dataset(tmp):
    (tmp / "data").mkdir()
    return _train(tmp / "data", tmp), ("error", "no class folders found")


def single_class(tmp):
    return _train(_classes(tmp, ["red_disc"]), tmp), ("error", "found one class ('red_disc'); "
                                                              "classification needs at least two")


def unwritable_output(tmp):
    data = _classes(tmp)
    (tmp / "a-file").write_text("not a folder")
    argv = _train(data, tmp)
    argv[argv.index("--output") + 1] = str(tmp / "a-file" / "run")
    return argv, ("error", "cannot write the run folder")


def broken_voc_xml(tmp):
    root = make_detection_dataset(tmp / "data", "voc", n_train=3, n_val=1)
    next((root / "train" / "annotations").glob("*.xml")).write_text("<annotation><object>")
    return _train(root, tmp, "detection"), ("error", "not valid XML")


def bad_yolo_line(tmp):
    root = make_detection_dataset(tmp / "data", "yolo", n_train=3, n_val=1)
    next((root / "train" / "labels").glob("*.txt")).write_text("0 0.5 0.5 0.2\n")
    return _train(root, tmp, "detection"), ("error", ":1: expected 'class cx cy w h' (5 values), got 4")


def multi_animal_deeplabcut(tmp):
    root = make_pose_dataset(tmp / "data", "dlc", n_train=3, n_val=1)
    (root / "config.yaml").write_text((root / "config.yaml").read_text() + "multianimalproject: true\n")
    return _train(root, tmp, "pose"), ("error", "multi-animal DeepLabCut projects are not supported")


def invalid_config_file(tmp):
    (tmp / "settings.yaml").write_text("epochs: [1, 2\n")
    return ["train", "--config", str(tmp / "settings.yaml")], ("error", "settings.yaml line 2: not valid YAML")


TRAINING_ROWS = [
    truncated_jpeg, zero_byte_file, text_named_jpg, decompression_bomb, cmyk_jpeg, png_16bit,
    exif_rotated_boxes, exif_rotated_keypoints, missing_image, negative_box, out_of_image_box, zero_area_box,
    nan_box, unknown_category, duplicate_image_ids, path_outside_dataset, keypoint_count_mismatch, nan_keypoints,
    empty_dataset, single_class, unwritable_output, broken_voc_xml, bad_yolo_line, multi_animal_deeplabcut,
    invalid_config_file,
]


@pytest.mark.parametrize("row", TRAINING_ROWS, ids=lambda f: f.__name__)
def test_bad_training_input(row, tmp_path, capsys):
    argv, expected = row(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if expected[0] == "error":
        assert code == 2, captured.err
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected[1] in lines[0], lines
        assert not (tmp_path / "run").exists()  # nothing half-written
        return
    assert code == 0, captured.err
    summary = json.loads(next((tmp_path / "run").glob("training_results*/training_summary.json")).read_text())
    if expected[0] == "skip":
        skipped = {Path(s["file"]).name: s["reason"] for s in summary["data"]["skipped"]}
        assert expected[2] in skipped[expected[1]]
    else:
        assert summary["data"]["counts"][expected[1]] == expected[2]


# -- bad trained runs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    data = make_classification_folder(tmp / "data", per_class_train=4, per_class_val=2)
    assert main(_train(data, tmp)) == 0
    return tmp / "run"


def _copy(run: Path, tmp: Path) -> Path:
    shutil.copytree(run, tmp / "run-copy")
    return tmp / "run-copy"


def adapter_label_count_mismatch(run: Path):
    info = json.loads((run / "trained_model_lora" / "visionlora.json").read_text())
    info["labels"] = info["labels"][:3]
    (run / "trained_model_lora" / "visionlora.json").write_text(json.dumps(info))
    return "weights do not fit base model"


def adapter_on_another_architecture(run: Path):
    from visionlora.tasks import get_task

    model, processor, _ = get_task("pose").model.build_model("tiny", ["a", "b", "c", "d"], None, "full")
    shutil.rmtree(run / "base_model")
    model.save_pretrained(run / "base_model")
    return "base_model: the base model changed since the adapter was trained"


def truncated_adapter_weights(run: Path):
    weights = run / "trained_model_lora" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return "weights file is truncated or damaged"


def pickled_adapter(run: Path):
    import torch
    from safetensors.torch import load_file

    folder = run / "trained_model_lora"
    torch.save(load_file(str(folder / "adapter_model.safetensors")), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    return "only pickled weights (adapter_model.bin); pickled .bin weights can run code"


def unfinished_run(run: Path):
    (run / "training_results_lora" / "training_summary.json").unlink()
    return "the run did not complete"


@pytest.mark.parametrize(
    "damage", [adapter_label_count_mismatch, adapter_on_another_architecture, truncated_adapter_weights,
               pickled_adapter, unfinished_run], ids=lambda f: f.__name__,
)
def test_bad_trained_run(damage, finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    message = damage(run)
    image = next((finished_run.parent / "data" / "val").rglob("*.png"))
    assert main(["predict", str(run), str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


def test_pickled_adapter_loads_when_allowed(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    pickled_adapter(run)
    image = next((finished_run.parent / "data" / "val").rglob("*.png"))
    assert main(["predict", str(run), str(image), "--allow-pickle"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"]
