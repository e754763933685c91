"""What users look at: trackers, per-class CSVs, diagnostic plots, the prediction grid,
report.html in a real browser, and the model card of exports."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil

import pytest
import yaml
from PIL import Image

from tests.browser import Chromium
from tests.conftest import read_data, tiny_config
from visionlora.cli import main
from visionlora.config import parse_report_to
from visionlora.deploy.export import export_run
from visionlora.errors import VisionLoraError
from visionlora.examples.synthetic import POSE_KEYPOINTS, make_detection_dataset, make_pose_dataset
from visionlora.reporting.compare import compare_runs
from visionlora.training.engine import train

PLOTS = {
    "classification": ["confusion_matrix.png"],
    "detection": ["precision_recall.png"],
    "pose": ["keypoint_errors.png", "pck_curve.png"],
}


@pytest.fixture(scope="module")
def runs(class_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    boxes = make_detection_dataset(root / "boxes-data", "coco", n_train=8, n_val=4)
    frames = make_pose_dataset(root / "pose-data", "coco", n_train=8, n_val=4)
    return {
        "classification": train(tiny_config("classification", class_folder, root / "cls", report_to="tensorboard")),
        "classification-full": train(tiny_config("classification", class_folder, root / "cls-full", mode="full")),
        "detection": train(tiny_config("detection", boxes, root / "det", model="tiny-rtdetr", epochs=1)),
        "pose": train(tiny_config("pose", frames, root / "pose", epochs=1)),
        "root": root,
    }


def test_tensorboard_scalars_equal_the_history(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = runs["classification"]
    events = EventAccumulator(str(result.paths.tracking_dir / "visionlora")).Reload()
    history = list(csv.DictReader(result.paths.history.open()))
    for tag, column in (("val/accuracy", "val_accuracy"), ("val/loss", "val_loss"), ("epoch/train_loss", "train_loss")):
        logged = [event.value for event in events.Scalars(tag)]
        assert logged == pytest.approx([float(row[column]) for row in history], rel=1e-5)  # the CSV keeps 6 digits
    steps = result.summary["training"]["optimizer_steps"]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, steps + 1))
    assert len(events.Scalars("train/lr")) == steps


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None or importlib.util.find_spec("wandb") is None,
                    reason="mlflow or wandb is not installed")
def test_mlflow_and_offline_wandb_record_the_epochs(class_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = train(tiny_config("classification", class_folder, tmp_path / "run", report_to="mlflow,wandb"))
    history = list(csv.DictReader(result.paths.history.open()))
    metric_files = list((result.paths.tracking_dir / "mlruns").glob("*/*/metrics/val/accuracy"))
    assert len(metric_files) == 1
    logged = [float(line.split()[1]) for line in metric_files[0].read_text().splitlines()]
    assert logged == pytest.approx([float(row["val_accuracy"]) for row in history], rel=1e-5)
    assert list((result.paths.tracking_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_unknown_or_missing_trackers_are_one_line(class_folder, tmp_path, capsys, monkeypatch):
    assert main(["train", "--data", str(class_folder), "--model", "tiny", "--report-to", "comet",
                 "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--report-to comet: unknown tracker (choose from tensorboard, mlflow, wandb, or none)")
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name))
    with pytest.raises(VisionLoraError, match=r"--report-to wandb: wandb is not installed \(pip install wandb\)"):
        parse_report_to("tensorboard,wandb")


@pytest.mark.parametrize("task", list(PLOTS))
def test_each_task_writes_its_plots_csv_and_grid(runs, task):
    result = runs[task]
    results = result.paths.results_dir
    for name in PLOTS[task] + ["predictions.png", "loss.png", "metrics.png"]:
        with Image.open(results / name) as image:
            assert image.width > 100 and image.height > 100
            if name != "predictions.png":
                assert round(image.info["dpi"][0]) == 200
    rows = list(csv.DictReader((results / "per_class.csv").open()))
    names = {"classification": ["blue_disc", "green_disc", "red_disc", "yellow_disc"],
             "detection": ["blue_box", "red_box"], "pose": POSE_KEYPOINTS}[task]
    key = "keypoint" if task == "pose" else "class"
    assert sorted(row[key] for row in rows) == sorted(names)
    if task == "classification":  # the CSV's recall is the per-class accuracy of the summary
        per_class = result.summary["metrics"]["per_class_accuracy"]
        assert {r["class"]: float(r["recall"]) for r in rows} == pytest.approx(per_class)
        assert sum(int(r["images"]) for r in rows) == result.summary["data"]["counts"]["val"]
    if task == "pose":
        errors = result.summary["metrics"]["per_keypoint_error"]
        assert {r["keypoint"]: float(r["pixel_error"]) for r in rows} == pytest.approx(errors, rel=1e-5)


def test_the_grid_takes_the_final_evaluations_predictions_which_predict_makes_too(runs, class_folder, tmp_path):
    """The classification grid shows the final evaluation's logits instead of predicting its images
    again: they are the predictions ``predict`` makes, each at its record's place (an unreadable
    image left out of both)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from visionlora.data.images import load_rgb
    from visionlora.data.records import image_source
    from visionlora.deploy.evaluation import evaluate_outputs
    from visionlora.deploy.prediction import predict
    from visionlora.tasks import get_task

    data = shutil.copytree(class_folder, tmp_path / "data")
    (data / "val" / "green_disc" / "green_disc_002_broken.png").write_bytes(b"not a png")
    result, task = runs["classification"], get_task("classification")
    records = read_data("classification", str(data)).val
    dataset, skipped = task.data.eval_dataset(records, result.processor, result.info)
    loader = DataLoader(dataset, batch_size=8, collate_fn=task.steps.collate)
    evaluation = evaluate_outputs(task, result.model, result.processor, loader, Accelerator(cpu=True), result.info)
    known = task.report.evaluated_predictions(dataset, evaluation.indices, evaluation.outputs, result.info)
    readable = [i for i, record in enumerate(records) if "broken" not in str(image_source(record))]
    assert len(skipped) == 1 and len(readable) == len(records) - 1 and sorted(known) == readable
    predicted = predict(task, result.model, result.processor, [load_rgb(image_source(records[i])) for i in readable],
                        result.info)
    assert [known[i]["label"] for i in readable] == [p["label"] for p in predicted]
    assert [known[i]["score"] for i in readable] == pytest.approx([p["score"] for p in predicted], abs=1e-5)


def _rendered_images(page, profile) -> dict:
    browser = Chromium(profile)
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=page.resolve().as_uri())
        browser.wait_for("document.readyState === 'complete'")
        return browser.evaluate(
            "(() => { const images = [...document.images];"
            " return {count: images.length, drawn: images.filter(i => i.complete && i.naturalWidth > 0).length,"
            " resources: performance.getEntriesByType('resource').length,"
            " text: document.body.innerText} })()")
    finally:
        browser.close()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_html_renders_every_image_in_chromium(runs, tmp_path):
    results = runs["detection"].paths.results_dir
    page = _rendered_images(results / "report.html", tmp_path / "profile")
    assert page["count"] == len(list(results.glob("*.png"))) == 4  # loss, metrics, precision-recall, grid
    assert page["drawn"] == page["count"] and page["resources"] == 0  # all embedded: nothing fetched
    assert "map" in page["text"] and "Per class" in page["text"]

    comparison = tmp_path / "compare"
    compare_runs(runs["classification"].paths.root, runs["classification-full"].paths.root, comparison)
    page = _rendered_images(comparison / "report.html", tmp_path / "profile2")
    assert page["drawn"] == page["count"] >= 5 and page["resources"] == 0
    assert "Comparison" in page["text"] and "trainable parameters" in page["text"]
    run_page = (runs["classification"].paths.results_dir / "report.html").read_text()
    assert "Comparison" in run_page  # the run's own report now shows the comparison it took part in


@pytest.mark.parametrize("fmt", ["merged", "onnx"])
def test_exports_carry_a_model_card(runs, tmp_path, fmt):
    result = runs["classification"]
    export_run(result.paths.root, tmp_path / fmt, fmt)
    text = (tmp_path / fmt / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["library_name"] == {"merged": "transformers", "onnx": "onnx"}[fmt]
    assert metadata["pipeline_tag"] == "image-classification" and f"{fmt}-export" in metadata["tags"]
    accuracy = next(m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"] if m["type"] == "accuracy")
    assert accuracy == result.summary["metrics"]["accuracy"]
    assert "[More Information Needed]" not in text and str(tmp_path / fmt) in text
    assert json.loads((tmp_path / fmt / "export.json").read_text())["format"] == fmt
    assert os.stat(tmp_path / fmt / "README.md").st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name", ["classification", "classification-full", "detection", "pose"])
def test_the_typed_summary_reads_and_writes_the_summary_file_unchanged(runs, name):
    from visionlora.reporting.run_summary import RunSummary

    written = json.loads(runs[name].paths.summary.read_text())
    summary = RunSummary.from_dict(written)
    assert summary.to_dict() == written
    assert list(summary.to_dict()) == list(written)  # the file's key order too
    assert summary.method == (written["lora"]["requested"]["method"] if written["lora"] else "full")
    assert summary.data.counts == written["data"]["counts"] and summary.training.epochs == written["training"]["epochs"]
    older = {k: v for k, v in written.items() if k not in ("headline", "test_metrics", "base_revision")}
    assert RunSummary.from_dict(older).headline.value == written["metrics"][written["main_metric"]]
