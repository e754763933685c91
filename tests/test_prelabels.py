"""``predict --format``: pre-labels for labelling tools, each read back equal to the predictions.

The project's own readers read the COCO, YOLO, VOC and DeepLabCut folders; label-studio-sdk's
LabelInterface validates the Label Studio predictions against the labelling config written beside
them; the CVAT file is checked against CVAT for images 1.1's documented structure.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_config
from visionlora.artifacts import find_run
from visionlora.cli import main
from visionlora.data.coco import read_coco_detection, read_coco_keypoints
from visionlora.data.coco_segmentation import read_coco_segmentation
from visionlora.data.deeplabcut import read_deeplabcut
from visionlora.data.records import clean_box
from visionlora.data.voc import read_voc
from visionlora.data.yolo import read_yolo


@pytest.fixture(scope="module")
def runs(class_folder, tmp_path_factory):
    """A classification, a detection and a pose run (one epoch each), and images to pre-label."""
    from visionlora.examples.segmentation import make_segmentation_dataset
    from visionlora.examples.synthetic import make_detection_dataset, make_pose_dataset
    from visionlora.training.engine import train

    root = tmp_path_factory.mktemp("prelabels")
    boxes = make_detection_dataset(root / "boxes-data", "coco", n_train=6, n_val=2)
    frames = make_pose_dataset(root / "pose-data", "dlc", n_train=6, n_val=2)
    shapes = make_segmentation_dataset(root / "regions-data", n_train=6, n_val=2, size=32)
    return {
        "classification": (train(tiny_config("classification", class_folder, root / "classes", epochs=1)).paths.root,
                           class_folder / "val" / "red_disc"),
        "detection": (train(tiny_config("detection", boxes, root / "boxes", epochs=1, model="tiny-rtdetr")).paths.root,
                      boxes / "val"),
        "pose": (train(tiny_config("pose", frames, root / "pose", epochs=1, mode="full")).paths.root,
                 frames / "labeled-data" / "video1"),
        "segmentation": (train(tiny_config("segmentation", shapes, root / "regions", epochs=1,
                                           image_size=32)).paths.root, shapes / "val" / "images"),
    }


def run_labels(run: Path) -> list[str]:
    return json.loads((find_run(run).model_dir / "visionlora.json").read_text())["labels"]


def predict(run: Path, images: Path, *flags: str) -> int:
    return main(["predict", str(run), str(images), *flags])


def predictions_of(run: Path, images: Path, target: Path, *flags: str) -> list[dict]:
    assert predict(run, images, "--output", str(target), *flags) == 0
    return json.loads(target.read_text())


def image_of(prediction: dict) -> Image.Image:
    with Image.open(prediction["image"]) as image:
        return image.copy()


def clipped_boxes(prediction: dict) -> list[tuple[str, list[float]]]:
    """The predicted boxes as labelling tools take them: clipped to the image, empty ones left out."""
    image = image_of(prediction)
    kept = [(found["label"], clean_box(found["box"], image.width, image.height)) for found in prediction["boxes"]]
    return [(label, box) for label, box in kept if box is not None]


def assert_same_boxes(records, predictions: list[dict], tolerance: float) -> None:
    by_name = {Path(record.image).name: record for record in records}
    assert len(by_name) == len(predictions)
    for prediction in predictions:
        record = by_name[Path(prediction["image"]).name]
        expected = clipped_boxes(prediction)
        assert record.labels == [label for label, _ in expected]
        np.testing.assert_allclose(np.reshape(record.boxes, (-1, 4)), np.reshape([b for _, b in expected], (-1, 4)),
                                   atol=tolerance)


def detection_predictions(runs, tmp_path) -> tuple[Path, Path, list[dict]]:
    run, images = runs["detection"]
    found = predictions_of(run, images, tmp_path / "boxes.json", "--threshold", "0.05")
    assert sum(len(p["boxes"]) for p in found) > 0, "the run must predict boxes for the round trip to test them"
    return run, images, found


@pytest.mark.parametrize("fmt, reader, tolerance", [
    ("coco", read_coco_detection, 1e-6), ("voc", read_voc, 0.006), ("yolo", read_yolo, 1e-3)])
def test_detection_dataset_folders_read_back_as_predicted(runs, tmp_path, fmt, reader, tolerance):
    run, images, found = detection_predictions(runs, tmp_path)
    target = tmp_path / fmt
    assert predict(run, images, "--threshold", "0.05", "--format", fmt, "--output", str(target)) == 0
    part = reader(target)
    assert part.dropped == []
    assert_same_boxes(part.records, found, tolerance)
    assert sorted((target / "images").iterdir()) and len(list((target / "images").iterdir())) == len(found)


def test_detection_label_studio_file_validates_in_the_sdk_and_holds_the_boxes(runs, tmp_path):
    from label_studio_sdk.label_interface import LabelInterface

    run, images, found = detection_predictions(runs, tmp_path)
    target = tmp_path / "tasks.json"
    assert predict(run, images, "--threshold", "0.05", "--format", "labelstudio", "--output", str(target)) == 0
    tasks = json.loads(target.read_text())
    interface = LabelInterface(target.with_suffix(".xml").read_text())
    assert sorted(interface.get_control("label").labels) == sorted(run_labels(run))
    for task, prediction in zip(tasks, found):
        assert task["data"]["image"] == prediction["image"]
        (given,) = task["predictions"]
        assert given["model_version"] == str(run)
        assert interface.validate_prediction(given, return_errors=True) == []
        boxes = [(r["value"]["rectanglelabels"][0],
                  [r["value"]["x"] * r["original_width"] / 100, r["value"]["y"] * r["original_height"] / 100,
                   (r["value"]["x"] + r["value"]["width"]) * r["original_width"] / 100,
                   (r["value"]["y"] + r["value"]["height"]) * r["original_height"] / 100]) for r in given["result"]]
        expected = clipped_boxes(prediction)
        assert [label for label, _ in boxes] == [label for label, _ in expected]
        np.testing.assert_allclose(np.reshape([b for _, b in boxes], (-1, 4)),
                                   np.reshape([b for _, b in expected], (-1, 4)), atol=1e-6)
        assert [r["score"] for r in given["result"]] == pytest.approx(
            [f["score"] for f in prediction["boxes"] if clean_box(f["box"], *image_of(prediction).size)])


def test_label_studio_sdk_converts_the_detection_predictions_to_coco_boxes(runs, tmp_path):
    """Label Studio's own converter (the predictions taken as annotations, as accepting them does)
    exports the boxes that were predicted."""
    from label_studio_sdk.converter import Converter

    run, images, found = detection_predictions(runs, tmp_path)
    target = tmp_path / "tasks.json"
    assert predict(run, images, "--threshold", "0.05", "--format", "labelstudio", "--output", str(target)) == 0
    tasks = json.loads(target.read_text())
    for number, task in enumerate(tasks, start=1):
        task.update(id=number, annotations=[{"result": task["predictions"][0]["result"]}])
    (tmp_path / "accepted.json").write_text(json.dumps(tasks))
    converter = Converter(target.with_suffix(".xml").read_text(), str(tmp_path), download_resources=False)
    converter.convert(str(tmp_path / "accepted.json"), str(tmp_path / "export"), "COCO", is_dir=False)
    exported = json.loads((tmp_path / "export" / "result.json").read_text())
    names = {c["id"]: c["name"] for c in exported["categories"]}
    for entry, prediction in zip(exported["images"], found):
        assert entry["file_name"] == prediction["image"]
        boxes = [(names[a["category_id"]], [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                           a["bbox"][1] + a["bbox"][3]])
                 for a in exported["annotations"] if a["image_id"] == entry["id"]]
        expected = clipped_boxes(prediction)
        assert [label for label, _ in boxes] == [label for label, _ in expected]
        np.testing.assert_allclose(np.reshape([b for _, b in boxes], (-1, 4)),
                                   np.reshape([b for _, b in expected], (-1, 4)), atol=0.011)


def cvat_images(path: Path, labels: list[str]) -> list[ET.Element]:
    """The image elements of a CVAT for images 1.1 file, after checking its documented structure."""
    root = ET.parse(path).getroot()
    assert root.tag == "annotations" and root.findtext("version") == "1.1"
    assert [label.findtext("name") for label in root.findall("meta/task/labels/label")] == labels
    images = root.findall("image")
    assert int(root.findtext("meta/task/size")) == len(images)
    for number, image in enumerate(images):
        assert image.get("id") == str(number) and image.get("name")
        assert int(image.get("width")) > 0 and int(image.get("height")) > 0
        for shape in image:
            assert shape.tag in ("box", "points", "polygon", "tag") and shape.get("label") in labels
            assert shape.get("source") == "auto"
    return images


def test_detection_cvat_xml_holds_the_boxes(runs, tmp_path):
    run, images, found = detection_predictions(runs, tmp_path)
    target = tmp_path / "annotations.xml"
    assert predict(run, images, "--threshold", "0.05", "--format", "cvat", "--output", str(target)) == 0
    labels = run_labels(run)
    for element, prediction in zip(cvat_images(target, labels), found):
        assert element.get("name") == Path(prediction["image"]).name
        boxes = [(b.get("label"), [float(b.get(k)) for k in ("xtl", "ytl", "xbr", "ybr")])
                 for b in element.findall("box")]
        expected = clipped_boxes(prediction)
        assert [label for label, _ in boxes] == [label for label, _ in expected]
        np.testing.assert_allclose(np.reshape([b for _, b in boxes], (-1, 4)),
                                   np.reshape([b for _, b in expected], (-1, 4)), atol=0.006)


def test_classification_label_studio_and_cvat_hold_each_label_and_score(runs, tmp_path):
    from label_studio_sdk.label_interface import LabelInterface

    run, images = runs["classification"]
    found = predictions_of(run, images, tmp_path / "classes.json")
    assert predict(run, images, "--format", "labelstudio", "--output", str(tmp_path / "ls.json")) == 0
    tasks = json.loads((tmp_path / "ls.json").read_text())
    interface = LabelInterface((tmp_path / "ls.xml").read_text())
    for task, prediction in zip(tasks, found):
        (given,) = task["predictions"]
        assert interface.validate_prediction(given, return_errors=True) == []
        assert given["result"][0]["value"]["choices"] == [prediction["label"]]
        assert given["score"] == pytest.approx(prediction["score"])
    assert predict(run, images, "--format", "cvat", "--output", str(tmp_path / "cvat.xml")) == 0
    labels = run_labels(run)
    tags = [image.find("tag") for image in cvat_images(tmp_path / "cvat.xml", labels)]
    assert [tag.get("label") for tag in tags] == [p["label"] for p in found]


def expected_keypoints(prediction: dict) -> np.ndarray:
    """(K, 3) as labelling tools take a prediction's first instance: x, y, 1 in the image, else 0, 0, 0."""
    width, height = image_of(prediction).size
    return np.array([[k["x"], k["y"], 1.0] if 0 <= k["x"] < width and 0 <= k["y"] < height else [0.0, 0.0, 0.0]
                     for k in prediction["instances"][0]["keypoints"]])


def test_pose_deeplabcut_and_coco_folders_read_back_as_predicted(runs, tmp_path):
    run, images = runs["pose"]
    found = predictions_of(run, images, tmp_path / "pose.json")
    expected = {Path(p["image"]).name: expected_keypoints(p) for p in found}
    expected = {name: keypoints for name, keypoints in expected.items() if keypoints[:, 2].any()}
    assert expected, "some keypoints must fall in the images for the round trip to test them"
    assert predict(run, images, "--format", "deeplabcut", "--output", str(tmp_path / "dlc")) == 0
    assert (tmp_path / "dlc" / "labeled-data" / "predicted" / "CollectedData_visionlora.csv").is_file()
    assert predict(run, images, "--format", "coco", "--output", str(tmp_path / "coco")) == 0
    for part in (read_deeplabcut(tmp_path / "dlc"), read_coco_keypoints(tmp_path / "coco")):
        assert part.labels == run_labels(run)
        read = {Path(r.image).name: r.instances[0].keypoints for r in part.records}
        assert set(read) == set(expected)
        for name, keypoints in read.items():
            np.testing.assert_allclose(keypoints, expected[name], atol=1e-6)


def test_pose_label_studio_keypoints_validate_in_the_sdk(runs, tmp_path):
    from label_studio_sdk.label_interface import LabelInterface

    run, images = runs["pose"]
    assert predict(run, images, "--format", "labelstudio", "--output", str(tmp_path / "ls.json")) == 0
    interface = LabelInterface((tmp_path / "ls.xml").read_text())
    tasks = json.loads((tmp_path / "ls.json").read_text())
    labels = run_labels(run)
    for task in tasks:
        (given,) = task["predictions"]
        assert interface.validate_prediction(given, return_errors=True) == []
        assert set(r["value"]["keypointlabels"][0] for r in given["result"]) <= set(labels)
        assert all(0 <= r["value"]["x"] <= 100 and 0 <= r["value"]["y"] <= 100 for r in given["result"])
    assert sum(len(task["predictions"][0]["result"]) for task in tasks) > 0


def test_segmentation_coco_folder_reads_back_the_predicted_masks_pixel_for_pixel(runs, tmp_path):
    from visionlora.data.masks import load_mask
    from visionlora.tasks.segmentation.prelabels import predicted_mask

    run, images = runs["segmentation"]
    found = predictions_of(run, images, tmp_path / "regions.json")
    assert predict(run, images, "--format", "coco", "--output", str(tmp_path / "coco")) == 0
    part = read_coco_segmentation(tmp_path / "coco")
    labels = run_labels(run)
    masks = {Path(r.image).name: load_mask(r, len(labels)) for r in part.records}
    assert set(masks) == {Path(p["image"]).name for p in found}
    for prediction in found:
        expected = predicted_mask(prediction)
        assert expected.shape == image_of(prediction).size[::-1]
        np.testing.assert_array_equal(masks[Path(prediction["image"]).name], expected)


def test_segmentation_polygons_outline_each_region_for_label_studio_and_cvat(tmp_path):
    """A mask of two regions: Label Studio's SDK validates the polygons, and both files' outlines
    cover each region (the pixel-centre outline loses at most half a pixel all round)."""
    import base64

    import cv2
    from label_studio_sdk.label_interface import LabelInterface

    from visionlora.core.labelling import LabelSource
    from visionlora.core.outputs import png_bytes
    from visionlora.tasks import get_task

    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[5:25, 10:30] = 1
    mask[30:38, 35:48] = 2
    image = Image.new("RGB", (50, 40))
    image.save(tmp_path / "scene.png")
    prediction = {"image": str(tmp_path / "scene.png"), "mask": base64.b64encode(png_bytes(Image.fromarray(mask)))
                  .decode()}
    source = LabelSource("runs/regions", ["background", "square", "bar"])
    formats = {f.name: f for f in get_task("segmentation").label_formats}
    formats["labelstudio"].write(tmp_path / "ls.json", [prediction], [image], source)
    formats["cvat"].write(tmp_path / "cvat.xml", [prediction], [image], source)
    (task,) = json.loads((tmp_path / "ls.json").read_text())
    interface = LabelInterface((tmp_path / "ls.xml").read_text())
    assert interface.validate_prediction(task["predictions"][0], return_errors=True) == []
    outlines = {r["value"]["polygonlabels"][0]: np.array(r["value"]["points"]) * [50 / 100, 40 / 100]
                for r in task["predictions"][0]["result"]}
    (element,) = cvat_images(tmp_path / "cvat.xml", source.labels)
    cvat = {p.get("label"): np.array([[float(v) for v in point.split(",")] for point in p.get("points").split(";")])
            for p in element.findall("polygon")}
    for found in (outlines, cvat):
        assert set(found) == {"square", "bar"}
        for number, label in ((1, "square"), (2, "bar")):
            drawn = np.zeros_like(mask)
            cv2.fillPoly(drawn, [np.round(found[label]).astype(np.int32)], 1)
            assert (drawn.astype(bool) == (mask == number)).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_rle_masks_draw_back_as_written(seed):
    """The RLE of random class maps (a first pixel set, and not) as the COCO reader draws them."""
    from visionlora.data.coco_masks import CocoMask, CocoShape, check_segmentation, rasterise
    from visionlora.tasks.segmentation.prelabels import rle

    mask = np.random.default_rng(seed).integers(0, 3, size=(7, 5)).astype(np.uint8)
    mask[0, 0] = seed + 1
    shapes = tuple(CocoShape(number, number, check_segmentation(rle(mask == number), 7, 5, "test"), False)
                   for number in (1, 2))
    np.testing.assert_array_equal(rasterise(CocoMask("test", 7, 5, shapes)), mask)


@pytest.mark.parametrize("flags, message", [
    (["--format", "yolo", "--output", "x"],
     "--format yolo: a classification run writes pre-labels as labelstudio, cvat"),
    (["--format", "pascal", "--output", "x"], "--format pascal: not a pre-label format (known: "),
    (["--format", "labelstudio"], "--format labelstudio needs --output FILE.json"),
])
def test_bad_formats_are_one_line_errors(runs, tmp_path, capsys, flags, message):
    run, images = runs["classification"]
    assert predict(run, images, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_a_dataset_folder_is_never_written_over(runs, tmp_path, capsys):
    run, images = runs["detection"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert predict(run, images, "--format", "coco", "--output", str(tmp_path / "taken")) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
