"""``visionlora select``: the least sure images, spread over the model's own features."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_config
from visionlora.cli import main
from visionlora.deploy.selection import pick
from visionlora.tasks import get_task


@pytest.fixture(scope="module")
def run(class_folder, tmp_path_factory):
    from visionlora.training.engine import train

    return train(tiny_config("classification", class_folder, tmp_path_factory.mktemp("select") / "run",
                             epochs=1)).paths.root


def select(*arguments) -> int:
    return main(["select", *map(str, arguments)])


def test_select_writes_k_distinct_paths_of_the_pool_and_a_contact_sheet(run, class_folder, tmp_path, capsys):
    pool = sorted((class_folder / "val").rglob("*.png"))
    assert select(run, class_folder / "val", "--count", 5, "--output", tmp_path / "next.txt") == 0
    picked = (tmp_path / "next.txt").read_text().splitlines()
    assert len(picked) == 5 and len(set(picked)) == 5
    assert set(picked) <= {str(path) for path in pool}
    with Image.open(tmp_path / "next.png") as sheet:
        assert sheet.size == (5 * 160, 160 + 16)
        assert len(set(np.asarray(sheet.convert("L")).ravel().tolist())) > 10  # images drawn, not a blank page
    assert "picked 5 of 24 images" in capsys.readouterr().err


def test_near_copies_are_not_picked_twice(run, class_folder, tmp_path):
    """A pool of one image copied ten times and a few others: the copies share their features, so at
    most one of them is picked whatever its uncertainty."""
    pool = tmp_path / "pool"
    pool.mkdir()
    original = sorted((class_folder / "val" / "red_disc").glob("*.png"))[0]
    for number in range(10):
        shutil.copyfile(original, pool / f"copy_{number}.png")
    for label in ("green_disc", "blue_disc", "yellow_disc"):
        for path in sorted((class_folder / "val" / label).glob("*.png"))[:2]:
            shutil.copyfile(path, pool / path.name)
    assert select(run, pool, "--count", 6, "--output", tmp_path / "next.txt", "--sheet", tmp_path / "sheet.png") == 0
    picked = (tmp_path / "next.txt").read_text().splitlines()
    assert sum("copy_" in line for line in picked) <= 1
    assert (tmp_path / "sheet.png").is_file()


def test_pick_spreads_where_uncertainty_alone_would_take_the_copies():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(6, 8))
    features = np.concatenate([np.repeat(distinct[:1], 5, axis=0), distinct[1:]])
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    uncertainty = np.array([0.9] * 5 + [0.5, 0.4, 0.3, 0.2, 0.1])
    assert list(np.argsort(-uncertainty)[:4]) == [0, 1, 2, 3]  # by uncertainty alone: four copies
    chosen = pick(uncertainty, features, 4)
    assert chosen[0] == 0 and len(set(chosen)) == 4
    assert sum(index < 5 for index in chosen) == 1


@pytest.mark.parametrize("task, sure, unsure", [
    ("classification", {"top_k": [{"label": "a", "score": 0.95}, {"label": "b", "score": 0.03}]},
     {"top_k": [{"label": "a", "score": 0.5}, {"label": "b", "score": 0.45}]}),
    ("detection", {"boxes": [{"label": "a", "score": 0.95, "box": [0, 0, 1, 1]}]},
     {"boxes": [{"label": "a", "score": 0.55, "box": [0, 0, 1, 1]}]}),
    ("pose", {"instances": [{"keypoints": [{"name": "a", "x": 1, "y": 1, "score": 0.9}]}]},
     {"instances": [{"keypoints": [{"name": "a", "x": 1, "y": 1, "score": 0.2}]}]}),
])
def test_each_task_ranks_an_unsure_prediction_above_a_sure_one(task, sure, unsure):
    prediction = get_task(task).prediction
    assert 0 <= prediction.uncertainty(sure) < prediction.uncertainty(unsure) <= 1


def test_segmentation_ranks_flat_class_probabilities_above_peaked_ones():
    import torch
    from transformers.modeling_outputs import SemanticSegmenterOutput

    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 1] = 8.0  # sure: class 1 everywhere
    logits[1, :, :, :2] = torch.tensor([0.0, 0.2, 0.1])[:, None, None]  # half the pixels near a uniform guess
    logits[1, 2, :, 2:] = 8.0
    sure, unsure = get_task("segmentation").prediction.output_uncertainty(SemanticSegmenterOutput(logits=logits))
    assert 0 <= sure < 0.01 < unsure < 1


@pytest.mark.parametrize("count, make_pool, message", [
    (100, "val", "error: --count 100: "),
    (0, "val", "error: --count must be at least 1, not 0"),
    (3, "empty", "error: no image files found in: "),
    (3, "broken", "error: no readable images to select from (skipped "),
])
def test_bad_input_is_a_one_line_error(run, class_folder, tmp_path, capsys, count, make_pool, message):
    pool = class_folder / "val" if make_pool == "val" else tmp_path / make_pool
    if make_pool != "val":
        pool.mkdir()
    if make_pool == "broken":
        for number in range(4):
            (pool / f"broken_{number}.png").write_bytes(b"not a png")
    assert select(run, pool, "--count", count, "--output", tmp_path / "next.txt") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert not (tmp_path / "next.txt").exists()
