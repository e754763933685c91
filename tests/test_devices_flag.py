"""Picking the device: ``runtime.pick_device``, ``--device`` on every command that loads or trains a model,
evaluation batches on the model's own device, and onnxruntime's CUDA provider for ONNX exports.

There is no GPU here: CUDA and MPS are faked where only the choice is checked, and a model on the
``meta`` device shows where batches go (a tensor made on the CPU instead would show up as such).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from visionlora import runtime
from visionlora.cli import build_parser, config_from_args, main
from visionlora.errors import VisionLoraError


class Stop(Exception):
    """Raised by a fake to end a path once it has shown what it was given."""


def _machine(monkeypatch, cuda: int = 0, mps: bool = False) -> None:
    """Fake a machine with ``cuda`` CUDA GPUs and (or) Apple MPS."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.fixture(scope="module")
def tiny_run(class_folder, tmp_path_factory) -> dict[str, Path]:
    """A finished tiny classification LoRA run, its ONNX export, and a validation image."""
    from visionlora.deploy.export import export_run
    from visionlora.training.engine import train

    root = tmp_path_factory.mktemp("devices")
    run = train(tiny_config("classification", class_folder, root / "run", epochs=1)).paths.root
    export_run(run, root / "onnx", "onnx")
    image = sorted(class_folder.glob("val/*/*.png"))[0]
    return {"run": run, "onnx": root / "onnx", "image": image}


# -- runtime.pick_device ------------------------------------------------------------------------
@pytest.mark.parametrize("cuda, mps, expected", [(2, True, "cuda"), (0, True, "mps"), (0, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    _machine(monkeypatch, cuda=cuda, mps=mps)
    assert runtime.pick_device("auto") == torch.device(expected)
    assert runtime.pick_device() == torch.device(expected)


def test_named_devices_are_checked_with_one_line_errors(monkeypatch):
    _machine(monkeypatch, cuda=2, mps=False)
    assert runtime.pick_device("cuda:1") == torch.device("cuda:1")
    assert runtime.pick_device("CPU") == torch.device("cpu")
    for name, message in [("cuda:2", "there is no GPU 2; torch sees 2 (cuda:0 to cuda:1)"),
                          ("mps", "Apple MPS is not available here"),
                          ("gpu", "expected one of auto|cpu|cuda[:N]|mps"),
                          ("cuda:x", "expected one of auto|cpu|cuda[:N]|mps")]:
        with pytest.raises(VisionLoraError, match="--device " + name) as err:
            runtime.pick_device(name)
        assert message in str(err.value) and "\n" not in str(err.value)
    _machine(monkeypatch, cuda=0, mps=True)
    assert runtime.pick_device("mps") == torch.device("mps")
    with pytest.raises(VisionLoraError, match="torch sees no CUDA GPU here"):
        runtime.pick_device("cuda")


# -- MPS picked by predict, evaluate and serve ----------------------------------------------------
class Placed(torch.nn.Module):
    """A model that records where it is moved, and stays where it is."""

    def __init__(self):
        super().__init__()
        self.moves: list[torch.device] = []

    def to(self, device, *args, **kwargs):
        self.moves.append(torch.device(device))
        return self


def test_a_loaded_run_goes_to_mps_where_mps_is_the_best_device(monkeypatch, tiny_run):
    import visionlora.deploy.predictor as predictor

    _machine(monkeypatch, cuda=0, mps=True)
    monkeypatch.setattr(predictor, "load_model", lambda *args, **kwargs: Placed())
    assert predictor.load_run(tiny_run["run"]).model.moves == [torch.device("mps")]


def test_the_model_store_picks_mps_where_mps_is_the_best_device(monkeypatch):
    from visionlora.serving.models import ModelStore

    _machine(monkeypatch, cuda=0, mps=True)
    assert ModelStore().device == "mps"
    assert ModelStore(device="cpu").device == "cpu"
    _machine(monkeypatch, cuda=1)
    assert ModelStore().device == "cuda"


# -- evaluate on the model's own device ---------------------------------------------------------
def test_evaluate_sends_batches_to_the_models_own_device(monkeypatch, tiny_run):
    import visionlora

    loaded = visionlora.load(tiny_run["run"], device="cpu")
    loaded.model.to("meta")
    seen = []

    def eval_step(model, batch, processor, info):
        seen.append({name: value.device for name, value in batch.items() if isinstance(value, torch.Tensor)})
        raise Stop

    monkeypatch.setattr(loaded.task.steps, "eval_step", eval_step)
    with pytest.raises(Stop):
        loaded.evaluate(batch_size=4)
    assert seen and set(seen[0].values()) == {torch.device("meta")}


# -- --device on the command line -----------------------------------------------------------------
def test_train_takes_device_as_a_setting_and_checks_it():
    config = config_from_args(build_parser().parse_args(["train", "--data", "x", "--device", "cuda:1"]))
    assert config.device == "cuda:1"
    assert config_from_args(build_parser().parse_args(["train", "--data", "x"])).device == "auto"
    with pytest.raises(VisionLoraError, match=r"--device must be one of auto\|cpu\|cuda\[:N\]\|mps, not 'gpu'"):
        config_from_args(build_parser().parse_args(["train", "--data", "x", "--device", "gpu"]))


@pytest.mark.parametrize("device, expected", [("cpu", {"cpu": True}), ("cuda:1", {}), ("auto", {})])
def test_training_asks_accelerate_for_the_picked_device(monkeypatch, class_folder, tmp_path, device, expected):
    from visionlora.training import engine

    _machine(monkeypatch, cuda=2)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    monkeypatch.setattr(torch.cuda, "device", lambda *args: __import__("contextlib").nullcontext())
    monkeypatch.setattr(runtime, "cpu_bf16_feature", lambda: None)
    given = {}

    def new_accelerator(**kwargs):
        given.update(kwargs)
        raise Stop

    monkeypatch.setattr(engine, "new_accelerator", new_accelerator)
    with pytest.raises(Stop):
        engine.train(tiny_config("classification", class_folder, tmp_path / "run", device=device,
                                 mixed_precision="auto"))
    assert {k: v for k, v in given.items() if k == "cpu"} == expected
    assert current == ([torch.device("cuda:1")] if device == "cuda:1" else [])
    assert given["mixed_precision"] == ("no" if device == "cpu" else "bf16")  # the CPU's rules on a CPU run


def test_several_processes_refuse_a_named_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(VisionLoraError, match="CUDA_VISIBLE_DEVICES"):
        runtime.accelerator_settings(torch.device("cuda:1"))


@pytest.mark.parametrize("command", [["evaluate"], ["predict", "IMAGE"]])
def test_the_device_flag_reaches_the_loader(monkeypatch, tiny_run, command):
    import visionlora.deploy.predictor as predictor

    given = []

    def load_run(run_dir, device=None, **loading):
        given.append(device)
        raise VisionLoraError("stop")

    monkeypatch.setattr(predictor, "load_run", load_run)
    argv = [command[0], str(tiny_run["run"]), *[str(tiny_run["image"])] * (len(command) - 1), "--device", "cuda:1"]
    assert main(argv) == 2
    assert given == ["cuda:1"]


def test_serve_passes_the_device_flag_to_the_model_store(monkeypatch, tiny_run):
    import visionlora.serving.models as models

    given = []

    def store(device=None, **settings):
        given.append(device)
        raise VisionLoraError("stop")

    monkeypatch.setattr(models, "ModelStore", store)
    assert main(["serve", str(tiny_run["run"]), "--device", "cpu"]) == 2
    assert given == ["cpu"]


def test_ray_refuses_a_device_other_than_auto(tmp_path, capsys):
    assert main(["serve", "--runs-dir", str(tmp_path), "--ray", "--device", "cuda:0"]) == 2
    assert "--device cuda:0 does not apply to --ray" in capsys.readouterr().err


def test_device_cpu_evaluates_and_predicts_end_to_end(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run["run"]), "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 24 and "accuracy" in metrics["metrics"]
    assert main(["predict", str(tiny_run["run"]), str(tiny_run["image"]), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"]
    assert main(["predict", str(tiny_run["run"]), str(tiny_run["image"]), "--device", "cuda:7"]) == 2
    assert "error: --device cuda:7: torch sees no CUDA GPU here" in capsys.readouterr().err


# -- ONNX: the CUDA provider, and --precision bf16 ----------------------------------------------------
class FakeSession:
    """An onnxruntime session that only records the providers asked for."""

    asked: list = []

    def __init__(self, path, options, providers):
        FakeSession.asked.append(providers)

    def get_inputs(self):
        return []


@pytest.fixture
def onnx_cuda(monkeypatch):
    """onnxruntime with a CUDA provider (sessions faked), on a machine with 2 GPUs."""
    import onnxruntime

    _machine(monkeypatch, cuda=2)
    FakeSession.asked = []
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider",
                                                                         "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    return FakeSession.asked


def test_onnx_runs_on_the_cuda_provider_of_the_picked_gpu(onnx_cuda, tiny_run):
    from visionlora.deploy.predictor import load_run

    load_run(tiny_run["onnx"], device="cuda:1")
    load_run(tiny_run["onnx"])
    load_run(tiny_run["onnx"], device="cpu")
    assert onnx_cuda == [[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"],
                         ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]


def test_served_onnx_runs_on_the_cuda_provider(onnx_cuda, tiny_run):
    from visionlora.serving.models import ModelStore

    ModelStore(device="cuda:1").add("exported", tiny_run["onnx"])
    assert onnx_cuda == [[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]]


def test_onnx_without_a_cuda_provider_runs_on_the_cpu_with_a_note(monkeypatch, capsys):
    import onnxruntime

    from visionlora.deploy.onnx_model import providers_for

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert providers_for(torch.device("cuda:0")) == ["CPUExecutionProvider"]
    assert "no CUDAExecutionProvider (pip install onnxruntime-gpu)" in capsys.readouterr().err


def _serve(monkeypatch, argv: list[str]) -> None:
    """``visionlora serve argv`` up to where it would listen."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    assert main(["serve", *argv]) == 0


def test_serving_onnx_with_bf16_says_it_runs_in_its_exported_precision(monkeypatch, tiny_run, capsys):
    _serve(monkeypatch, [str(tiny_run["onnx"]), "--precision", "bf16"])
    err = capsys.readouterr().err
    assert f"note: --precision bf16 applies to torch models: an ONNX export runs in the precision it was " \
           f"exported in (fp32, or int8 weights): {tiny_run['onnx'].resolve()}" in err
    _serve(monkeypatch, [str(tiny_run["onnx"])])
    assert "note" not in capsys.readouterr().err


def test_serving_bf16_where_the_device_emulates_it_says_so(monkeypatch, tiny_run, capsys):
    monkeypatch.setattr(runtime, "cpu_bf16_feature", lambda: None)
    _serve(monkeypatch, [str(tiny_run["run"]), "--precision", "bf16", "--device", "cpu"])
    # the reason names the CPU, or the ONEDNN_MAX_CPU_ISA cap where one is set
    assert "note: --precision bf16: cpu runs bf16 emulated, not natively (" in capsys.readouterr().err
    monkeypatch.setattr(runtime, "cpu_bf16_feature", lambda: "AVX512-BF16")
    _serve(monkeypatch, [str(tiny_run["run"]), "--precision", "bf16", "--device", "cpu"])
    assert "note" not in capsys.readouterr().err
