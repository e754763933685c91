"""Serving and predict precision: auto's choice through the oneDNN ISA cap, its check against fp32 and the
fall-back, bf16 answers against ``predict --precision bf16``, and the precision shown by /v1/models and /metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import visionlora
from tests.conftest import NATIVE_BF16, assert_nested_close
from visionlora.cli import main
from visionlora.deploy import precision
from visionlora.serving.app import ServeSettings, create_app
from visionlora.serving.models import ModelStore

BF16_TOLERANCE = 0.02  # served bf16 scores against predict --precision bf16 (other batches, other kernels)
AVX2_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _val_images(class_folder: Path, count: int = 4) -> list[Path]:
    return sorted((class_folder / "val").rglob("*.png"))[:count]


def _dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {parameter.dtype for parameter in model.parameters()}


def test_auto_predicts_in_fp32_under_an_isa_cap_without_bf16(served_runs, class_folder):
    """A process whose oneDNN is capped at AVX2 (a CPU without native bf16, as far as torch's kernels go)
    predicts in fp32 under auto, and says why."""
    image = _val_images(class_folder, 1)[0]
    done = subprocess.run([sys.executable, "-m", "visionlora", "predict", str(served_runs["ants"]), str(image),
                           "--device", "cpu"], capture_output=True, text=True, env={**os.environ, **AVX2_CAP},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "precision fp32 (auto: ONEDNN_MAX_CPU_ISA=AVX2 leaves oneDNN no bf16 instructions)" in done.stderr
    assert json.loads(done.stdout)[0]["label"] == visionlora.load(served_runs["ants"]).predict([image])[0]["label"]


def test_auto_picks_bf16_where_it_is_native_and_checks_it_against_fp32(served_runs, monkeypatch):
    store = ModelStore("cpu", precision="auto")
    served = store.add("ants", served_runs["ants"])
    described = served.describe()
    if not NATIVE_BF16:  # this CPU has no AVX512-BF16 or AMX: auto keeps fp32, unchecked
        assert described["precision"] == "fp32" and described["precision_check"] is None
        return
    assert described["precision"] == "bf16" and described["precision_reason"].startswith("auto: this CPU has ")
    check = described["precision_check"]
    assert check["source"] == "validation" and check["images"] == precision.CHECK_IMAGES
    assert check["top1_agreement"] >= precision.MIN_TOP1_AGREEMENT and 0 < check["max_abs_diff"] <= 0.25
    assert _dtypes(served.base.model) == {torch.bfloat16}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # read at each choice, as training's auto reads it
    assert precision.choose_precision("auto", torch.device("cpu")).name == "fp32"


def test_auto_falls_back_to_fp32_past_the_limit_with_the_fp32_answers(served_runs, class_folder, monkeypatch,
                                                                      capsys):
    """Where bf16 is native (made so here) but the run's bf16 outputs are past the limit (made 0 here), the
    model keeps fp32 weights, says so in one line, and answers exactly as fp32 predict."""
    monkeypatch.setattr(precision, "resolve_precision_on", lambda device, requested: ("bf16", "auto: native"))
    monkeypatch.setattr(precision, "MAX_ABS_DIFF", 0.0)
    store = ModelStore("cpu", precision="auto")
    served = store.add("ants", served_runs["ants"])
    lines = [line for line in capsys.readouterr().err.splitlines() if "runs in fp32" in line]
    assert len(lines) == 1 and "past the limits" in lines[0] and "max |diff|" in lines[0]
    described = served.describe()
    assert described["precision"] == "fp32" and described["precision_check"]["max_abs_diff"] > 0
    assert _dtypes(served.base.model) == {torch.float32}
    images = [Image.open(path).convert("RGB") for path in _val_images(class_folder)]
    assert served.predict(images) == visionlora.load(served_runs["ants"]).predict(images)


def test_bf16_answers_equal_predict_bf16_and_the_precision_is_shown(served_runs, class_folder, capsys):
    """Served in bf16 (mixing adapters of one base), answers equal ``predict --precision bf16`` within
    BF16_TOLERANCE; /v1/models and /metrics say each model's precision."""
    store = ModelStore("cpu", precision="bf16")
    app = create_app(store, ServeSettings(max_wait_ms=1, precision="bf16"))
    files = _val_images(class_folder)
    with TestClient(app) as client:
        for name in ("ants", "bees"):
            store.add(name, served_runs[name])
        answers = [client.post("/v1/models/ants/predict", files={"file": (path.name, path.read_bytes())})
                   for path in files]
        models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        metrics = client.get("/metrics").text
    assert all(answer.status_code == 200 for answer in answers)
    assert models["ants"]["precision"] == models["bees"]["precision"] == "bf16"
    assert models["ants"]["compiled"] is False and models["ants"]["compile_warmup_s"] is None
    assert 'visionlora_model_precision{model="ants",precision="bf16"} 1.0' in metrics
    assert _dtypes(store.models["ants"].base.model) == {torch.bfloat16}
    capsys.readouterr()
    assert main(["predict", str(served_runs["ants"]), *map(str, files), "--precision", "bf16",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "precision bf16 (asked for with --precision)" in out.err
    expected = json.loads(out.out)
    for answer, wanted in zip(answers, expected):
        got = answer.json()["predictions"][0]
        assert got["label"] == wanted["label"]
        assert_nested_close(got, {**wanted, "image": Path(wanted["image"]).name}, tolerance=BF16_TOLERANCE)


def test_fp32_serving_shows_fp32_in_metrics(served_runs):
    store = ModelStore("cpu")
    with TestClient(create_app(store, ServeSettings(max_wait_ms=1))) as client:
        store.add("boxes", served_runs["boxes"])
        models = client.get("/v1/models").json()["models"]
        metrics = client.get("/metrics").text
    assert models[0]["precision"] == "fp32" and models[0]["precision_reason"] == "asked for with --precision"
    assert 'visionlora_model_precision{model="boxes",precision="fp32"} 1.0' in metrics


def test_a_bad_precision_is_one_line(served_runs, capsys):
    with pytest.raises(SystemExit):
        main(["predict", str(served_runs["ants"]), "x.png", "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(visionlora.VisionLoraError, match="--precision fp16: choose one of auto, fp32, bf16"):
        ModelStore("cpu", precision="fp16")


def test_a_mixed_batch_in_bf16_answers_as_each_adapter_alone_in_bf16():
    """Adapters cast with their base gather bf16 A/B weights; each row answers as its adapter alone."""
    from tests.test_mixed_adapters import _adapters, _images
    from visionlora.deploy.prediction import predict, predict_mixed
    from visionlora.modeling.mixed_batches import prepare_mixed_batches

    task, model, views = _adapters("classification", 3)
    prepare_mixed_batches(model)
    precision.cast_to_bf16(model)
    assert _dtypes(model) == {torch.bfloat16}
    images = _images(6)
    mixed = predict_mixed(task, model, images, [views[i % 3] for i in range(6)])
    for index, view in enumerate(views):
        model.set_adapter(view.adapter)
        rows = [i for i in range(6) if i % 3 == index]
        alone = predict(task, model, view.processor, [images[i] for i in rows], view.info)
        for row, answer in zip(rows, alone):
            assert mixed[row]["label"] == answer["label"]
            assert_nested_close(mixed[row], answer, tolerance=BF16_TOLERANCE, where=f"image {row}")
    assert len({answer["label"][-1] for answer in mixed}) == 3  # each view's labels: a mix-up would show


def test_export_says_which_engine_is_fastest_here(served_runs, tmp_path, capsys):
    assert main(["export", str(served_runs["ants"]), "--output", str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("fastest here: "))
    timed = ["ONNX fp32", "PyTorch fp32"] + (["PyTorch bf16"] if NATIVE_BF16 else [])
    assert line.split(" (")[0].removeprefix("fastest here: ") in timed
    assert all(f"{engine} " in line for engine in timed) and ("not timed: PyTorch bf16" in line) != NATIVE_BF16
