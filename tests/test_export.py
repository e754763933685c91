"""Export: merged checkpoints that plain transformers loads, ONNX models that run in onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visionlora
from tests.conftest import assert_nested_close, tiny_config
from visionlora.cli import main
from visionlora.deploy.export import export_run
from visionlora.examples.segmentation import make_segmentation_dataset
from visionlora.examples.synthetic import make_detection_dataset, make_pose_dataset
from visionlora.serving.models import ModelStore
from visionlora.training.engine import train

CASES = {
    "classification-lora": ("classification", "lora", "tiny"),
    "classification-full": ("classification", "full", "tiny"),
    "detection-lora": ("detection", "lora", "tiny"),
    "detection-full": ("detection", "full", "tiny-rtdetr"),
    "pose-lora": ("pose", "lora", "tiny"),
    "pose-full": ("pose", "full", "tiny"),
    "segmentation-lora": ("segmentation", "lora", "tiny"),
    "segmentation-full": ("segmentation", "full", "tiny"),
}
AUTO_CLASSES = {"classification": "AutoModelForImageClassification", "detection": "AutoModelForObjectDetection",
                "pose": "AutoModelForPoseEstimation", "segmentation": "AutoModelForSemanticSegmentation"}


@pytest.fixture(scope="module")
def exports(class_folder, tmp_path_factory):
    """A trained run of each task and mode, with its merged and ONNX exports."""
    root = tmp_path_factory.mktemp("exports")
    data = {"classification": class_folder,
            "detection": make_detection_dataset(root / "boxes", "coco", n_train=16, n_val=4),
            "pose": make_pose_dataset(root / "frames", "dlc", n_train=8, n_val=3),
            "segmentation": make_segmentation_dataset(root / "regions", n_train=8, n_val=3, size=32)}
    made = {}
    for case, (task, mode, model) in CASES.items():
        # RT-DETR ranks its queries by score: barely trained, near-tied scores make the ranking fragile
        epochs = 20 if model == "tiny-rtdetr" else 2
        run = train(tiny_config(task, data[task], root / case, mode=mode, model=model, epochs=epochs)).paths.root
        made[case] = {fmt: root / f"{case}-{fmt}" for fmt in ("merged", "onnx")}
        for fmt, target in made[case].items():
            export_run(run, target, fmt)
        made[case]["run"] = run
        made[case]["images"] = _images(task, data[task])
    return made


def _images(task: str, data: Path) -> list[Path]:
    pattern = {"classification": "val/*/*.png", "detection": "val/images/*.png", "pose": "labeled-data/*/*.png",
               "segmentation": "val/images/*.png"}[task]
    return sorted(data.glob(pattern))[:3]


def _close(a, b, tolerance=1e-4):
    assert_nested_close(a, b, tolerance, rounding=0.01)  # coordinates print 2 decimals


@pytest.mark.parametrize("case", list(CASES))
def test_merged_export_loads_with_plain_transformers_and_predicts_alike(exports, case):
    import transformers

    task, mode, _ = CASES[case]
    merged = exports[case]["merged"]
    assert not (merged / "adapter_config.json").exists()
    model = getattr(transformers, AUTO_CLASSES[task]).from_pretrained(merged).eval()
    assert "Peft" not in type(model).__name__
    run = visionlora.load(exports[case]["run"])
    reloaded = visionlora.load(merged)
    images = [Image.open(p).convert("RGB") for p in exports[case]["images"]]
    with torch.no_grad():
        batch = run.task.prediction.model_inputs([item.pixel_values for i, im in enumerate(images)
                                       for item in run.task.prediction.predict_inputs(im, i, run.processor, run.info,
                                                                           {"boxes": None, "threshold": 0.5})])
        plain = model(**batch, **run.info.forward_kwargs)
        adapter = run.model(**batch, **run.info.forward_kwargs)
    for name in run.task.output_names:
        assert torch.allclose(getattr(plain, name), getattr(adapter, name), atol=1e-4), name
    _close(reloaded.predict(images), run.predict(images))


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_export_runs_in_onnxruntime_and_predict_agrees(exports, case, capsys):
    record = json.loads((exports[case]["onnx"] / "export.json").read_text())
    assert record["format"] == "onnx" and record["opset"] == 17 and "torch.onnx.export" in record["exporter"]
    assert record["predictions_agree"] is True
    if case != "detection-full":  # RT-DETR picks queries by top-k over near-tied scores: boxes are compared
        assert record["onnx_max_abs_diff"] < 1e-3
    outputs = []
    for source in ("run", "merged", "onnx"):
        assert main(["predict", str(exports[case][source]), *map(str, exports[case]["images"]),
                     "--precision", "fp32"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    from visionlora.deploy.onnx_model import OnnxModel

    assert isinstance(visionlora.load(exports[case]["onnx"]).model, OnnxModel)
    _close(outputs[1], outputs[0])
    _close(outputs[2], outputs[0], tolerance=1e-3)


def test_onnx_detr_takes_other_batch_sizes_and_image_shapes(exports, tmp_path):
    run = visionlora.load(exports["detection-lora"]["run"])
    onnx = visionlora.load(exports["detection-lora"]["onnx"])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for h, w in ((48, 96), (80, 60), (64, 64))]
    _close(onnx.predict(images, threshold=0.0), run.predict(images, threshold=0.0), tolerance=1e-3)


def test_merged_export_evaluates_and_serves(exports, class_folder, capsys):
    merged = exports["classification-lora"]["merged"]
    assert main(["evaluate", str(merged)]) == 2
    assert "an export has no validation split of its own; pass --data" in capsys.readouterr().err
    from_run = visionlora.load(exports["classification-lora"]["run"]).evaluate(str(class_folder))
    assert visionlora.load(merged).evaluate(str(class_folder))["metrics"]["accuracy"] == from_run["metrics"]["accuracy"]
    store = ModelStore("cpu")
    served = store.add("merged", merged)
    image = Image.open(exports["classification-lora"]["images"][0]).convert("RGB")
    _close(served.predict([image]), visionlora.load(merged).predict([image]))


def test_onnx_exports_serve_with_the_same_answers_as_predict(exports, tmp_path, capsys):
    """Every task's ONNX export through the server's HTTP API (batched, requests in parallel) answers
    what ``visionlora predict`` gives for the same export, and the server counts them."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from visionlora.serving.app import ServeSettings, create_app

    store = ModelStore("cpu")
    for case in CASES:
        store.add(case, exports[case]["onnx"])
    options = {"pose": {"boxes": "[[2, 3, 60, 70]]"}, "detection": {"threshold": "0.0"}}
    jobs = [(case, path) for case in CASES for path in exports[case]["images"]]
    with TestClient(create_app(store, ServeSettings(max_batch_size=4, max_wait_ms=20))) as client:
        def ask(job):
            case, path = job
            answer = client.post(f"/v1/models/{case}/predict", files={"file": (path.name, path.read_bytes())},
                                 data=options.get(CASES[case][0], {}))
            assert answer.status_code == 200, answer.text
            return answer.json()["predictions"][0]

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(ask, jobs[::2] + jobs[1::2]))
        listed = {model["name"]: model for model in client.get("/v1/models").json()["models"]}
        metrics = client.get("/metrics").text
    assert listed["classification-lora"]["mixing"] == "an ONNX model has no adapter to mix"
    served = len(exports["pose-full"]["images"])
    assert f'visionlora_requests_total{{endpoint="predict",model="pose-full",status="200"}} {served}.0' in metrics
    assert 'visionlora_batch_images_count{model="pose-full"}' in metrics
    for (case, path), answer in zip(jobs[::2] + jobs[1::2], answers):
        boxes = tmp_path / "boxes.json"
        boxes.write_text(json.dumps({path.name: [[2, 3, 60, 70]]}))
        flags = {"pose": ["--boxes", str(boxes)], "detection": ["--threshold", "0"]}
        assert main(["predict", str(exports[case]["onnx"]), str(path), *flags.get(CASES[case][0], [])]) == 0
        expected = {k: v for k, v in json.loads(capsys.readouterr().out)[0].items() if k != "image"}
        assert_nested_close({key: answer.get(key) for key in expected}, expected, 1e-5)


def test_onnx_export_predicts_a_video_with_set_threads(exports, tmp_path, capsys):
    from visionlora.examples.synthetic import make_pose_video

    video = make_pose_video(tmp_path / "clip.mp4", frames=6, fps=10)
    threads = torch.get_num_threads()
    assert main(["predict", str(exports["pose-lora"]["onnx"]), str(video), "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    onnx = json.loads(capsys.readouterr().out)
    assert main(["predict", str(exports["pose-lora"]["run"]), str(video), "--precision", "fp32"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert len(onnx["frames"]) == 6
    _close(onnx["frames"], run["frames"], tolerance=1e-3)
    assert main(["predict", str(exports["pose-lora"]["onnx"]), str(video), "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_bad_exports_are_one_line_and_leave_nothing(exports, tmp_path, capsys, monkeypatch):
    run = str(exports["classification-full"]["run"])

    def one_line(argv, text):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], lines

    one_line(["export", run, "--output", str(tmp_path / "a"), "--format", "tflite"],
             "--format 'tflite': choose one of merged, onnx")
    one_line(["export", run, "--output", str(exports["classification-full"]["merged"])],
             "pass --overwrite to replace it")
    (tmp_path / "unfinished" / "checkpoint").mkdir(parents=True)
    (tmp_path / "unfinished" / "checkpoint" / "progress.json").write_text('{"completed_epochs": 1, "batches_done": 0}')
    one_line(["export", str(tmp_path / "unfinished"), "--output", str(tmp_path / "b")], "the run did not complete")
    one_line(["export", run, "--output", str(tmp_path / "b"), "--quantize", "int8"],
             "--quantize int8 quantizes an ONNX model: add --format onnx")
    one_line(["export", run, "--output", str(tmp_path / "b"), "--format", "onnx", "--quantize", "int8",
              "--max-metric-drop", "-1"], "--max-metric-drop must be 0 or more, got -1.0")

    def refuses(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy_op' to ONNX opset version 17 is not supported.")

    monkeypatch.setattr(torch.onnx, "export", refuses)
    one_line(["export", run, "--output", str(tmp_path / "c"), "--format", "onnx"],
             "ViTForImageClassification: the ONNX exporter cannot handle this model: "
             "Exporting the operator 'aten::fancy_op'")
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c*"))


def test_int8_export_is_measured_against_fp32_and_served(exports, tmp_path, capsys):
    run, target = exports["classification-lora"]["run"], tmp_path / "int8"
    assert main(["export", str(run), "--format", "onnx", "--quantize", "int8", "--output", str(target)]) == 0
    assert "int8: validation accuracy" in capsys.readouterr().out
    record = json.loads((target / "export.json").read_text())["quantization"]
    summary = json.loads(next(run.glob("training_results_*/training_summary.json")).read_text())
    assert record["fp32"] == summary["metrics"]["accuracy"]  # the fp32 model's own validation figure
    assert record["metric_drop"] == record["fp32"] - record["int8"] <= record["max_metric_drop"] == 0.01
    assert 0 < record["max_abs_diff"] < 0.1 and 0.5 <= record["top1_agreement"] <= 1
    assert record["int8_bytes"] < record["fp32_bytes"] and not (target / "model.int8.onnx").exists()
    image = Image.open(exports["classification-lora"]["images"][0]).convert("RGB")
    served = ModelStore("cpu").add("int8", target)
    _close(served.predict([image]), visionlora.load(target).predict([image]), tolerance=1e-6)


def test_an_int8_model_that_loses_accuracy_is_refused_and_leaves_nothing(exports, tmp_path, monkeypatch, capsys):
    """A quantization that wrecks the classifier (its weights zeroed after quantizing) falls below the
    limit: one line naming both figures, exit 2, no folder."""
    import onnx
    import onnxruntime.quantization as quantization
    from onnx import numpy_helper

    real = quantization.quantize_dynamic

    def wrecked(source, target, **kwargs):
        real(source, target, **kwargs)
        model = onnx.load(target)
        for weight in model.graph.initializer:
            if "classifier" in weight.name and weight.data_type == onnx.TensorProto.INT8:
                weight.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(weight)), weight.name))
        onnx.save(model, target)

    monkeypatch.setattr(quantization, "quantize_dynamic", wrecked)
    target = tmp_path / "int8"
    argv = ["export", str(exports["classification-lora"]["run"]), "--format", "onnx", "--quantize", "int8",
            "--output", str(target)]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "int8 accuracy 0.2" in lines[0] and "against fp32" in lines[0], lines
    assert "more than --max-metric-drop 0.01" in lines[0]
    assert not target.exists() and not list(tmp_path.glob(".int8*"))


def test_adapters_over_one_onnx_base_answer_as_peft_and_serve_from_one_session(exports, class_folder, tmp_path,
                                                                                capsys):
    """Two LoRA runs of one base (other alpha, same rank) share an ONNX base; a pose run gets its own;
    a full run falls back to a merged ONNX model with one line. Served together, each answers as itself."""
    from concurrent.futures import ThreadPoolExecutor

    from visionlora.deploy.export import check_images, max_difference, raw_outputs

    other = train(tiny_config("classification", class_folder, tmp_path / "other", epochs=1, lora_alpha=8)).paths.root
    runs = [exports["classification-lora"]["run"], other, exports["pose-lora"]["run"],
            exports["classification-full"]["run"]]
    target = tmp_path / "adapters"
    assert main(["export", *map(str, runs), "--format", "onnx-adapters", "--output", str(target)]) == 0
    out = capsys.readouterr().out
    assert "classification-full: a fully fine-tuned model has no adapter; exported as a merged ONNX model" in out
    record = json.loads((target / "export.json").read_text())
    assert [base["runs"] for base in record["bases"]] == [["classification-lora", "other"], ["pose-lora"]]
    assert record["runs"]["classification-full"]["format"] == "onnx"
    for label in ("classification-lora", "other", "pose-lora"):
        part = record["runs"][label]
        assert part["format"] == "onnx-adapter" and part["onnx_max_abs_diff"] <= 1e-4
        assert part["adapter_bytes"] < (target / part["base"].removeprefix("../")).joinpath("model.onnx").stat().st_size
    for label, run in (("classification-lora", runs[0]), ("other", other), ("pose-lora", runs[2])):
        torch_run, onnx_run = visionlora.load(run), visionlora.load(target / label)
        images = check_images(torch_run)
        assert max_difference(raw_outputs(torch_run, torch_run.model, images),
                              raw_outputs(torch_run, onnx_run.model, images)) <= 1e-4

    store = ModelStore("cpu")
    for label in ("classification-lora", "other", "classification-full"):
        store.add(label, target / label)
    assert len([key for key in store.bases if key[0] == "onnx-adapters"]) == 1
    assert store.models["other"].describe()["shares_base_with"] == ["classification-lora"]
    images = [Image.open(p).convert("RGB") for p in sorted((class_folder / "val").rglob("*.png"))[:4]]
    jobs = [(label, image) for image in images for label in ("classification-lora", "other", "classification-full")]
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda job: store.models[job[0]].predict([job[1]])[0], jobs))
    expected = {label: visionlora.load(run) for label, run in
                (("classification-lora", runs[0]), ("other", other), ("classification-full", runs[3]))}
    for (label, image), answer in zip(jobs, answers):
        _close(answer, expected[label].predict([image])[0], tolerance=1e-4)

    def one_line(argv, text):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], lines

    one_line(["export", *map(str, runs[:2]), "--format", "onnx", "--output", str(tmp_path / "x")],
             "--format onnx exports one run; several runs go to --format onnx-adapters")
    one_line(["export", str(runs[0]), "--format", "onnx-adapters", "--quantize", "int8", "--output",
              str(tmp_path / "x")], "--quantize int8 applies to --format onnx, not to onnx-adapters")
    assert not (tmp_path / "x").exists()
