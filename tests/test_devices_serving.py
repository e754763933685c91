"""Serving on accelerators, checked on CPUs: out-of-memory forwards retried in halves and answered as
JSON, out-of-memory loads answered alike, zero-GPU Ray workers on the CPU where CUDA is available,
bases shared with a sibling already on another device, and mixed-adapter forwards that copy row
indices from the host once per batch, not in every layer."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_nested_close, tiny_config
from tests.test_mixed_adapters import _adapters, _images
from visionlora.training.engine import train


@pytest.fixture(scope="module")
def runs(class_folder, tmp_path_factory) -> Path:
    """A folder of runs holding ``ants``, a LoRA run."""
    root = tmp_path_factory.mktemp("device-runs") / "runs"
    train(tiny_config("classification", class_folder, root / "ants", epochs=1))
    return root


def _fake_cuda(monkeypatch) -> list[str]:
    """CUDA reported available from now on (once the runs are loaded: loading would pin memory), and each
    ``torch.cuda.empty_cache()`` recorded; nothing runs on CUDA."""
    emptied: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append("emptied"))
    return emptied


def _images_of(class_folder: Path, count: int) -> list[tuple[str, tuple[str, bytes]]]:
    paths = sorted((class_folder / "val").rglob("*.png"))[:count]
    return [("file", (path.name, path.read_bytes())) for path in paths]


def _out_of_memory_above(model: torch.nn.Module, images: int):
    """A hook making ``model``'s forwards of more than ``images`` images run out of memory; its handle."""

    def refuse(module, args, kwargs):
        if kwargs["pixel_values"].shape[0] > images:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return model.register_forward_pre_hook(refuse, with_kwargs=True)


def _server(store):
    from visionlora.serving.app import ServeSettings, create_app

    return create_app(store, ServeSettings(max_wait_ms=1))


def test_a_forward_out_of_memory_is_retried_in_halves_and_answers_as_without(runs, class_folder, monkeypatch):
    from fastapi.testclient import TestClient

    from visionlora.serving.models import ModelStore

    store = ModelStore("cpu")
    store.add("ants", runs / "ants")
    files = _images_of(class_folder, 4)
    cuda_cache = _fake_cuda(monkeypatch)
    with TestClient(_server(store)) as client:
        expected = client.post("/v1/models/ants/predict", files=files)
        handle = _out_of_memory_above(store.models["ants"].base.model, images=1)
        try:
            answer = client.post("/v1/models/ants/predict", files=files)
        finally:
            handle.remove()
        metrics = client.get("/metrics").text
    assert expected.status_code == 200 and answer.status_code == 200, answer.text
    assert_nested_close(answer.json(), expected.json(), where="retried in halves")
    assert cuda_cache == ["emptied"] * 3  # 4 images, then 2 and 2: three forwards ran out of memory
    assert "visionlora_forward_splits_total 3.0" in metrics


def test_an_image_that_never_fits_is_a_json_503_counted_and_the_server_keeps_serving(runs, class_folder,
                                                                                      monkeypatch):
    from fastapi.testclient import TestClient

    from visionlora.serving.models import ModelStore

    store = ModelStore("cpu")
    store.add("ants", runs / "ants")
    files = _images_of(class_folder, 2)
    cuda_cache = _fake_cuda(monkeypatch)
    with TestClient(_server(store)) as client:
        handle = _out_of_memory_above(store.models["ants"].base.model, images=0)
        try:
            refused = client.post("/v1/models/ants/predict", files=files)
        finally:
            handle.remove()
        served = client.post("/v1/models/ants/predict", files=files)
        metrics = client.get("/metrics").text
    assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
    message = refused.json()["error"]
    assert "out of accelerator memory" in message and "'ants'" in message and "\n" not in message
    assert served.status_code == 200 and len(served.json()["predictions"]) == 2
    assert 'visionlora_failures_total{cause="forward_out_of_memory",model="ants"} 1.0' in metrics
    assert 'visionlora_requests_total{endpoint="predict",model="ants",status="503"} 1.0' in metrics
    assert len(cuda_cache) == 3  # the pair, then each image alone


def test_in_a_batch_only_the_request_with_an_image_that_never_fits_fails():
    """Three requests share one forward; the one whose image never fits fails, the others are answered,
    each image with its own per-image option."""
    from visionlora.serving.batching import Batcher, Job
    from visionlora.serving.memory import OutOfMemory

    def predict(images, models, tag):
        if "huge" in images or len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [{"image": image, "tag": value} for image, value in zip(images, tag)]

    async def scenario():
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = Batcher(predict, pool, max_batch_size=8, max_wait_ms=200)
            jobs = [Job(images, {"tag": [f"{image}!" for image in images]}, ("tag",))
                    for images in (["a", "b"], ["huge"], ["c"])]
            return await asyncio.gather(*(batcher.submit(job) for job in jobs), return_exceptions=True)

    first, second, third = asyncio.run(scenario())
    assert first == [{"image": "a", "tag": "a!"}, {"image": "b", "tag": "b!"}]
    assert isinstance(second, OutOfMemory)
    assert third == [{"image": "c", "tag": "c!"}]


def test_a_cold_load_out_of_memory_is_a_json_503_and_a_later_request_loads_it(runs, class_folder, monkeypatch):
    from fastapi.testclient import TestClient

    from visionlora.serving import models
    from visionlora.serving.models import ModelStore

    def out_of_memory(module, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 300.00 MiB")

    store = ModelStore("cpu", runs)
    files = _images_of(class_folder, 1)
    cuda_cache: list[str] = []
    with TestClient(_server(store)) as client:
        with monkeypatch.context() as moving:
            moving.setattr(torch.nn.Module, "to", out_of_memory)
            moving.setattr(models, "free_cached_memory", lambda: cuda_cache.append("emptied"), raising=False)
            refused = client.post("/v1/models/ants/predict", files=files)
        served = client.post("/v1/models/ants/predict", files=files)
        metrics = client.get("/metrics").text
    assert refused.status_code == 503 and refused.headers["retry-after"].isdigit(), refused.text
    assert "memory" in refused.json()["error"] and "'ants'" in refused.json()["error"]
    assert cuda_cache == ["emptied"]
    assert served.status_code == 200, served.text
    assert 'visionlora_failures_total{cause="load_out_of_memory",model="ants"} 1.0' in metrics


def test_zero_gpu_replicas_and_actors_load_on_the_cpu_where_cuda_is_available(runs, monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'visionlora[ray]')")
    from visionlora.serving.ray import Replica
    from visionlora.serving.ray_batch import RunPredictor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # Ray no longer hides GPUs from such workers
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    replicas, actors = {}, {}
    for gpus in (0.0, 0.5, 1.0):
        replica = Replica.func_or_class({"runs_dir": str(runs), "max_loaded": 2, "replica_gpus": gpus})
        replicas[gpus] = replica.store.device  # where every run it loads goes
        replica.__del__()
        actors[gpus] = RunPredictor({}, {}, gpus=gpus).store.device
    assert replicas == actors == {0.0: "cpu", 0.5: "cuda", 1.0: "cuda"}


class _OnAnotherDevice(torch.nn.Parameter):
    """A parameter that says it is on CUDA, as a sibling base's weights are once moved there."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)


def test_a_base_takes_the_equal_weights_of_a_sibling_already_on_the_gpu():
    from visionlora.serving.models import _share_equal_weights

    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    sibling = {name: _OnAnotherDevice(parameter.detach().clone(), requires_grad=False)
               for name, parameter in model.named_parameters()}
    sibling["1.weight"] = _OnAnotherDevice(torch.randn(4, 4, generator=generator))  # trained apart: other values
    sibling["2.weight"] = _OnAnotherDevice(torch.randn(5, 4, generator=generator))  # a head of another size
    _share_equal_weights(model, sibling)
    shared = {name for name, parameter in model.named_parameters() if parameter is sibling[name]}
    assert shared == {"0.weight", "0.bias", "1.bias", "2.bias"}


class _CountingTorch:
    """``torch`` as a module sees it, counting the tensors it makes from Python values."""

    def __init__(self, calls: list[str]):
        self.calls = calls

    def __getattr__(self, name: str):
        value = getattr(torch, name)
        if name not in ("tensor", "as_tensor"):
            return value

        def counted(*args, **kwargs):
            self.calls.append(name)
            return value(*args, **kwargs)

        return counted


def test_a_mixed_forward_copies_row_indices_from_the_host_once_not_in_every_layer(monkeypatch):
    from peft.tuners.lora import LoraLayer

    from visionlora.deploy import prediction
    from visionlora.deploy.prediction import predict, predict_mixed
    from visionlora.modeling import mixed_batches

    task, model, views = _adapters("classification", 3)
    mixed_batches.prepare_mixed_batches(model)
    images = _images(6)
    per_image = [views[i % 3] for i in range(6)]
    calls: list[str] = []
    with monkeypatch.context() as counting:
        for module in (mixed_batches, prediction):
            counting.setattr(module, "torch", _CountingTorch(calls))
        mixed = predict_mixed(task, model, images, per_image)
    layers = sum(isinstance(module, LoraLayer) for module in model.modules())
    assert layers >= 4 and len(calls) <= 2, f"{len(calls)} tensors made from Python values over {layers} layers"
    for index, view in enumerate(views):  # the answers stay each adapter's own
        model.set_adapter(view.adapter)
        alone = predict(task, model, view.processor, images[index::3], view.info)
        assert_nested_close(mixed[index::3], alone, where=view.adapter)


def test_row_indices_are_made_on_the_models_device():
    from visionlora.modeling.mixed_batches import BASE_ROWS, MixedRows

    rows = MixedRows(["b", BASE_ROWS, "b", "a"], "meta")
    assert rows == ["b", BASE_ROWS, "b", "a"] and rows.adapters == ["b", BASE_ROWS, "a"]
    assert rows.positions.device.type == "meta" and rows.positions.shape == (4,)
    assert {name: index.device.type for name, index in rows.rows.items()} == dict.fromkeys(rows.adapters, "meta")
    assert torch.equal(MixedRows(["b", BASE_ROWS, "b", "a"], "cpu").rows["b"], torch.tensor([0, 2]))
