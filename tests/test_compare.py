"""visionlora compare: both modes trained alike, and the comparison files match the summaries."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from visionlora.cli import main


def test_compare_trains_both_modes_and_reports_every_figure(class_folder, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(class_folder), "--model", "tiny", "--epochs", "1", "--lr", "1e-3",
                 "--no-progress", "--output", str(out)]) == 0
    assert "| metric: accuracy |" in capsys.readouterr().out
    lora = json.loads((out / "lora" / "training_results_lora" / "training_summary.json").read_text())
    full = json.loads((out / "full" / "training_results" / "training_summary.json").read_text())
    assert (lora["mode"], full["mode"]) == ("lora", "full")
    for key in ("epochs", "batch_size", "seed", "lr", "data"):
        assert lora["training"][key] == full["training"][key]

    comparison = json.loads((out / "comparison.json").read_text())
    rows = {row["name"]: row for row in comparison["rows"]}
    mb = 1024 * 1024
    expected = {
        "metric: accuracy": (lora["metrics"]["accuracy"], full["metrics"]["accuracy"]),
        "metric: macro_f1": (lora["metrics"]["macro_f1"], full["metrics"]["macro_f1"]),
        "weights file": (lora["sizes"]["weights_file_bytes"] / mb, full["sizes"]["weights_file_bytes"] / mb),
        "trainable parameters": (lora["parameters"]["trainable"], full["parameters"]["trainable"]),
        "trainable": (lora["parameters"]["trainable_percent"], full["parameters"]["trainable_percent"]),
        "training time": (lora["time"]["train_seconds"], full["time"]["train_seconds"]),
        "training images/s": (lora["time"]["train_images_per_second"], full["time"]["train_images_per_second"]),
        "peak memory (process RSS)": (lora["memory"]["peak_rss_bytes"] / mb, full["memory"]["peak_rss_bytes"] / mb),
    }
    for name, (a, b) in expected.items():
        assert rows[name]["a"] == pytest.approx(a, abs=1e-3), name
        assert rows[name]["b"] == pytest.approx(b, abs=1e-3), name
        assert rows[name]["ratio"] == pytest.approx(rows[name]["a"] / rows[name]["b"]), name
    assert rows["weights file"]["ratio"] < 0.5 and rows["trainable"]["b"] == 100

    markdown = (out / "comparison.md").read_text()
    for name in expected:
        assert f"| {name}" in markdown
    with Image.open(out / "comparison.png") as image:
        assert image.width > 1000


def test_compare_two_finished_runs(class_folder, tmp_path):
    for name, rank in (("a", "4"), ("b", "8")):
        assert main(["train", "--data", str(class_folder), "--model", "tiny", "--epochs", "1", "--lora-r", rank,
                     "--no-progress", "--output", str(tmp_path / name)]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "cmp")]) == 0
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert (comparison["runs"]["a"]["label"], comparison["runs"]["b"]["label"]) == ("a", "b")
    trainable = next(r for r in comparison["rows"] if r["name"] == "trainable parameters")
    assert trainable["a"] < trainable["b"]


def test_compare_needs_two_runs_or_data(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "two run folders" in capsys.readouterr().err
