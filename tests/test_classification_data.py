"""Reading classification data: layouts, conversions, skips and clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import read_data, tiny_config
from visionlora.data.images import UnreadableImage, decode_all, load_rgb
from visionlora.errors import VisionLoraError
from visionlora.examples.synthetic import classification_image, make_classification_folder
from visionlora.training.engine import train


def _jpeg_bytes(size=(40, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=(10, 200, 30) if mode == "RGB" else 128).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def folder_with_bad_files(tmp_path) -> Path:
    root = make_classification_folder(tmp_path / "data", per_class_train=6, per_class_val=3,
                                      classes=["red_disc", "blue_disc"])
    ants = root / "train" / "red_disc"
    (ants / "truncated.jpg").write_bytes(_jpeg_bytes((200, 200))[:300])
    (ants / "empty.jpg").write_bytes(b"")
    (ants / "notes.jpg").write_text("this is not an image")
    (ants / "readme.txt").write_text("ignored: not an image extension")
    return root


def test_unreadable_images_are_skipped_counted_and_listed(folder_with_bad_files, tmp_path):
    result = train(tiny_config("classification", folder_with_bad_files, tmp_path / "run", epochs=1))
    data = result.summary["data"]
    assert data["counts"]["train"] == 12
    assert data["skipped_count"] == 4
    reasons = {Path(s["file"]).name: s["reason"] for s in data["skipped"]}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "notes.jpg", "readme.txt"}
    assert "not a readable image" in reasons["empty.jpg"]
    assert "not an image file extension" in reasons["readme.txt"]


@pytest.mark.parametrize(
    "mode, make",
    [
        ("L", lambda: Image.new("L", (20, 10), 100)),
        ("P", lambda: Image.new("RGB", (20, 10), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)),
        ("RGBA", lambda: Image.new("RGBA", (20, 10), (0, 0, 255, 0))),
        ("I;16", lambda: Image.fromarray(np.full((10, 20), 65535, dtype=np.uint16))),
        ("CMYK", lambda: Image.new("CMYK", (20, 10), (0, 255, 255, 0))),
    ],
)
def test_image_modes_become_8bit_rgb(tmp_path, mode, make):
    image = make()
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (20, 10)
    pixel = rgb.getpixel((5, 5))
    expected = {"L": (100, 100, 100), "P": (200, 10, 10), "RGBA": (255, 255, 255), "I;16": (255, 255, 255)}
    if mode in expected:
        assert pixel == expected[mode]
    else:
        assert pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60  # CMYK (0,255,255,0) is red


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(UnreadableImage, match="pixel limit"):
        load_rgb(tmp_path / "big.png")


def test_decode_all_keeps_order_and_reports_skips(tmp_path):
    good = tmp_path / "good.png"
    classification_image("red_disc", np.random.default_rng(0)).save(good)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    result = decode_all([good, tmp_path / "bad.jpg", good], lambda im, _: im.size)
    assert list(result.items) == [(48, 48), (48, 48)] and result.kept == [0, 2]
    assert result.skipped == [{"file": str(tmp_path / "bad.jpg"),
                               "reason": "not a readable image (unknown format or empty file)"}]


def test_flat_layout_is_split_by_seed_per_class(tmp_path):
    root = make_classification_folder(tmp_path / "d", per_class_train=10, per_class_val=0) / "train"
    first = read_data("classification", str(root), None, seed=3, val_fraction=0.2)
    again = read_data("classification", str(root), None, seed=3, val_fraction=0.2)
    other = read_data("classification", str(root), None, seed=4, val_fraction=0.2)
    assert len(first.train) == 32 and len(first.val) == 8
    assert {r.label for r in first.val} == set(first.labels)
    assert [r.source for r in first.val] == [r.source for r in again.val]
    assert [r.source for r in first.val] != [r.source for r in other.val]
    assert not {r.source for r in first.val} & {r.source for r in first.train}


def test_separate_validation_folder(tmp_path):
    root = make_classification_folder(tmp_path / "d", per_class_train=4, per_class_val=2)
    data = read_data("classification", str(root / "train"), str(root / "val"), seed=0, val_fraction=0.2)
    assert len(data.train) == 16 and len(data.val) == 8


def test_saved_hugging_face_dataset_folder(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    names = ["red_disc", "blue_disc"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    rows = {"image": [classification_image(names[i % 2], rng) for i in range(10)], "label": [i % 2 for i in range(10)]}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "validation": split.select(range(4))}).save_to_disk(tmp_path / "hf")
    data = read_data("classification", str(tmp_path / "hf"), None, seed=0, val_fraction=0.2)
    assert data.labels == ["red_disc", "blue_disc"]
    assert len(data.train) == 10 and len(data.val) == 4
    assert load_rgb(data.train[0].source).size == (48, 48)


def test_empty_class_folder_is_a_clear_error(tmp_path):
    root = make_classification_folder(tmp_path / "d", per_class_train=3, per_class_val=1,
                                      classes=["red_disc", "blue_disc"])
    (root / "train" / "green_disc").mkdir()
    with pytest.raises(VisionLoraError, match=r"green_disc.*holds no images"):
        read_data("classification", str(root), None, seed=0, val_fraction=0.2)


def test_a_single_class_is_a_clear_error(tmp_path):
    root = make_classification_folder(tmp_path / "d", per_class_train=3, per_class_val=1, classes=["red_disc"])
    with pytest.raises(VisionLoraError, match="found one class .'red_disc'.; classification needs at least two"):
        read_data("classification", str(root), None, seed=0, val_fraction=0.2)


def test_validation_class_unknown_to_training_is_a_clear_error(tmp_path):
    root = make_classification_folder(tmp_path / "d", per_class_train=3, per_class_val=1,
                                      classes=["red_disc", "blue_disc"])
    make_classification_folder(tmp_path / "v", per_class_train=0, per_class_val=1, classes=["green_disc", "red_disc"])
    with pytest.raises(VisionLoraError, match="validation classes not in training: green_disc"):
        read_data("classification", str(root / "train"), str(tmp_path / "v"), seed=0, val_fraction=0.2)


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(VisionLoraError, match="no such folder"):
        read_data("classification", str(tmp_path / "missing" / "a" / "b"), None, seed=0, val_fraction=0.2)
