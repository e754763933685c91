"""Decoded images in RAM, in the reusable disk cache, or decoded per batch; and --max-steps."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visionlora
from tests.conftest import tiny_config
from visionlora.data.cache import CachePlan, read_entry
from visionlora.data.images import decode_all
from visionlora.data.transforms import resize_for_training
from visionlora.examples.synthetic import make_classification_folder, make_detection_dataset, make_pose_dataset
from visionlora.training.engine import train


def _prepare(image, _):
    return resize_for_training(image, (32, 32))


@pytest.fixture
def pictures(tmp_path) -> list[Path]:
    folder = make_classification_folder(tmp_path / "pictures", per_class_train=3, per_class_val=0)
    return sorted((folder / "train").rglob("*.png"))


@pytest.mark.parametrize("task", ["classification", "detection", "pose"])
def test_ram_disk_and_none_train_identically(task, tmp_path):
    data = {"classification": lambda: make_classification_folder(tmp_path / "data", per_class_train=6, per_class_val=3),
            "detection": lambda: make_detection_dataset(tmp_path / "data", "coco", n_train=8, n_val=3),
            "pose": lambda: make_pose_dataset(tmp_path / "data", "dlc", n_train=8, n_val=3)}[task]()
    summaries = {}
    for mode in ("ram", "disk", "none"):
        cfg = tiny_config(task, data, tmp_path / mode, epochs=2, cache=mode, cache_dir=str(tmp_path / "cache"),
                          model="tiny-rtdetr" if task == "detection" else "tiny")
        summaries[mode] = train(cfg).summary
    for mode in ("disk", "none"):
        assert summaries[mode]["metrics"] == summaries["ram"]["metrics"]
        assert summaries[mode]["metrics_in_training_precision"] == summaries["ram"]["metrics_in_training_precision"]
        assert summaries[mode]["data"]["counts"] == summaries["ram"]["data"]["counts"]
    cache = summaries["disk"]["data"]["cache"]
    entries = sum(entry.stat().st_size for entry in (tmp_path / "cache").rglob("*.safetensors"))
    assert cache["mode"] == "disk" and cache["location"] == str(tmp_path / "cache") and cache["bytes"] == entries
    assert summaries["none"]["data"]["cache"]["mode"] == "none"


def test_a_second_run_reuses_the_disk_cache(pictures, tmp_path):
    plan = CachePlan("disk", tmp_path / "cache")
    first = decode_all(pictures, _prepare, cache=plan, settings="s")
    second = decode_all(pictures, _prepare, cache=plan, settings="s")
    assert (first.report.decoded, first.report.reused) == (len(pictures), 0)
    assert (second.report.decoded, second.report.reused) == (0, len(pictures))
    for a, b in zip(first.items, second.items):
        assert np.array_equal(a, b)
    other = decode_all(pictures, _prepare, cache=plan, settings="other settings")
    assert other.report.reused == 0  # another preparation is another entry


def test_a_changed_image_file_is_decoded_again(pictures, tmp_path):
    plan = CachePlan("disk", tmp_path / "cache")
    decode_all(pictures, _prepare, cache=plan)
    time.sleep(0.01)
    Image.new("RGB", (48, 48), (1, 2, 3)).save(pictures[0])
    again = decode_all(pictures, _prepare, cache=plan)
    assert (again.report.decoded, again.report.reused) == (1, len(pictures) - 1)
    assert (again.items[0] == np.array([1, 2, 3], dtype=np.uint8)).all()


def test_a_truncated_or_damaged_entry_is_rebuilt_not_read(pictures, tmp_path):
    plan = CachePlan("disk", tmp_path / "cache")
    decode_all(pictures, _prepare, cache=plan)
    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    truncated, flipped = entries[0], entries[1]
    truncated.write_bytes(truncated.read_bytes()[:100])
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 0xFF  # one pixel byte changed: the checksum catches it
    flipped.write_bytes(bytes(data))
    assert read_entry(truncated) is None and read_entry(flipped) is None
    again = decode_all(pictures, _prepare, cache=plan)
    fresh = decode_all(pictures, _prepare)
    for index in range(len(pictures)):
        assert np.array_equal(again.items[index], fresh.items[index])
    for entry in (truncated, flipped):  # rewritten whole: each holds one of the images again
        assert any(np.array_equal(read_entry(entry), item) for item in fresh.items)


def test_two_processes_building_one_cache_both_finish_with_a_correct_cache(pictures, tmp_path):
    script = (
        "import sys; from pathlib import Path\n"
        "from visionlora.data.cache import CachePlan\n"
        "from visionlora.data.images import decode_all\n"
        "from visionlora.data.transforms import resize_for_training\n"
        "files = sorted(Path(sys.argv[1]).rglob('*.png'))\n"
        "result = decode_all(files * 20, lambda im, _: resize_for_training(im, (32, 32)),"
        " cache=CachePlan('disk', Path(sys.argv[2])), threads=4)\n"
        "print(len(result.items))\n"
    )
    folder = pictures[0].parents[1]
    runs = [subprocess.Popen([sys.executable, "-c", script, str(folder), str(tmp_path / "cache")],
                             stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120)[0].strip() for run in runs]
    assert [run.returncode for run in runs] == [0, 0] and outputs == [str(20 * len(pictures))] * 2
    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == len(pictures) and not list((tmp_path / "cache").rglob("*.tmp"))
    fresh = decode_all(pictures, _prepare)
    cached = decode_all(pictures, _prepare, cache=CachePlan("disk", tmp_path / "cache"))
    assert cached.report.reused == len(pictures)
    for a, b in zip(cached.items, fresh.items):
        assert np.array_equal(a, b)


def test_max_steps_stops_where_it_says(class_folder, tmp_path):
    result = train(tiny_config("classification", class_folder, tmp_path / "run", epochs=10, batch_size=8, max_steps=3))
    summary = result.summary
    assert summary["training"]["optimizer_steps"] == 3
    assert summary["training"]["epochs_run"] == 1 and summary["best_epoch"] == 1
    evaluated = visionlora.load(result.paths.root).evaluate()["metrics"]
    assert summary["metrics"]["accuracy"] == pytest.approx(evaluated["accuracy"]) and result.paths.summary.is_file()
