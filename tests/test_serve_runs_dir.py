"""``visionlora serve --runs-dir``: runs loaded on first request, at most N held, mixed-adapter
batches answering as ``visionlora predict``; the server is started on loopback and stopped by its pid."""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import visionlora
from tests.conftest import assert_nested_close, tiny_config
from tests.test_serve import Server
from visionlora.training.engine import train

MAX_LOADED = 3


def _variant(run: Path, copy: Path, seed: int) -> Path:
    """A copy of ``run`` whose adapter and head weights are moved a little: another adapter of the same base."""
    shutil.copytree(run, copy)
    weights = next((copy / "trained_model_lora").glob("adapter_model.safetensors"))
    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(seed)
    save_file({name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
               for name, tensor in tensors.items()}, weights)
    return copy


@pytest.fixture(scope="module")
def runs_dir(class_folder, tmp_path_factory):
    """Six LoRA runs of one base in one folder (one with a 3-class head, five with 4) and a spare run."""
    root = tmp_path_factory.mktemp("runs-dir")
    runs = root / "runs"
    first = train(tiny_config("classification", class_folder, runs / "first", epochs=1)).paths.root
    base = str(first / "base_model")
    second = train(tiny_config("classification", class_folder, runs / "second", epochs=1, seed=3,
                               model=base)).paths.root
    three = root / "three-classes"
    for split in ("train", "val"):
        for folder in sorted((class_folder / split).iterdir())[:3]:
            shutil.copytree(folder, three / split / folder.name)
    train(tiny_config("classification", three, runs / "three", epochs=1, model=base))
    for index in range(3):
        _variant(second, runs / f"variant{index}", seed=index)
    _variant(second, root / "spare", seed=9)
    _variant(second, root / "outside", seed=10)
    return root


@pytest.fixture(scope="module")
def server(runs_dir):
    running = Server([], runs_dir / "server.log", "--runs-dir", str(runs_dir / "runs"),
                     "--max-loaded-adapters", str(MAX_LOADED), "--max-wait-ms", "150", "--precision", "fp32")
    yield running
    assert running.stop() in (0, -signal.SIGTERM)
    assert "Traceback" not in (runs_dir / "server.log").read_text()


def _metric(server: Server, name: str, labels: str = "") -> float:
    text = server.request("GET", "/metrics")[1].decode()
    pattern = re.compile(rf"^{name}{re.escape(labels)}\s+(\S+)$" if labels else rf"^{name}(?:{{[^}}]*}})?\s+(\S+)$",
                         re.M)
    return sum(float(value) for value in pattern.findall(text))


def _ask(server: Server, name: str, image: Path) -> tuple[int, dict]:
    status, body, _ = server.post_files(f"/v1/models/{name}/predict", [(image.name, image.read_bytes())])
    return status, json.loads(body)


def _models(server: Server) -> dict[str, dict]:
    return {m["name"]: m for m in json.loads(server.request("GET", "/v1/models")[1])["models"]}


RUNS = ("first", "second", "three", "variant0", "variant1", "variant2")


def test_runs_are_listed_before_any_is_loaded(server):
    models = _models(server)
    assert set(models) == set(RUNS)
    assert not any(model["loaded"] for model in models.values())
    assert _metric(server, "visionlora_loaded_adapters") == 0


def test_interleaved_requests_over_six_adapters_answer_as_predict_and_share_forwards(server, runs_dir, class_folder):
    images = sorted((class_folder / "val").rglob("*.png"))[:4]
    jobs = [(name, image) for image in images for name in RUNS]  # interleaved: every run in turn
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda job: _ask(server, *job), jobs))
    loaded = {name: visionlora.load(runs_dir / "runs" / name) for name in RUNS}
    expected = {name: loaded[name].predict(images) for name in RUNS}
    for (name, image), (status, answer) in zip(jobs, answers):
        assert status == 200, answer
        prediction = answer["predictions"][0]
        assert_nested_close({k: prediction[k] for k in expected[name][0]}, expected[name][images.index(image)],
                            where=f"{name} {image.name}")
    assert len({json.dumps(expected[name][0]) for name in RUNS}) == len(RUNS)  # six different adapters
    assert {p["label"] for p in expected["three"]} <= set(loaded["three"].info.labels)
    mixed_forwards = _metric(server, "visionlora_forward_images_count") - _metric(
        server, "visionlora_forward_images_count", '{adapters="1"}')
    assert mixed_forwards > 0, "no forward mixed adapters"


def test_at_most_n_runs_stay_loaded_and_unloads_are_counted(server, class_folder):
    image = sorted((class_folder / "val").rglob("*.png"))[0]
    assert all(_ask(server, name, image)[0] == 200 for name in RUNS)
    models = _models(server)
    assert sum(model["loaded"] for model in models.values()) <= MAX_LOADED
    assert _metric(server, "visionlora_loaded_adapters") <= MAX_LOADED
    assert _metric(server, "visionlora_adapter_loads_total") >= len(RUNS)
    assert _metric(server, "visionlora_adapter_evictions_total") >= len(RUNS) - MAX_LOADED
    assert _metric(server, "visionlora_adapter_load_seconds_count") == _metric(server, "visionlora_adapter_loads_total")
    loaded = [model for model in models.values() if model["loaded"]]
    assert loaded and all(model["mixes"] and model["last_used"] for model in loaded)
    four_classes = {model["name"] for model in loaded if len(model["labels"]) == 4}
    for model in loaded:  # one base for the 4-class heads; the 3-class head has a base copy of its own
        assert set(model["shares_base_with"]) == (four_classes - {model["name"]} if model["name"] in four_classes
                                                  else set())


def test_a_run_added_later_is_served_and_many_first_requests_load_it_once(server, runs_dir, class_folder):
    shutil.copytree(runs_dir / "spare", runs_dir / "runs" / "spare")
    image = sorted((class_folder / "val").rglob("*.png"))[0]
    loads = _metric(server, "visionlora_adapter_loads_total")
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: _ask(server, "spare", image), range(8)))
    assert all(status == 200 for status, _ in answers)
    for _, answer in answers[1:]:  # the requests land in batches of other sizes, which round differently
        assert_nested_close(answer, answers[0][1])
    assert _metric(server, "visionlora_adapter_loads_total") == loads + 1


@pytest.mark.parametrize("name", ["..", "%2e%2e", ".hidden", "missing", "unfinished", "outside-link", "runs%2Ffirst"])
def test_names_that_are_not_finished_runs_in_the_folder_answer_404(server, runs_dir, class_folder, name):
    runs = runs_dir / "runs"
    if not (runs / "unfinished").exists():
        (runs / "unfinished" / "trained_model_lora").mkdir(parents=True)
        (runs / "outside-link").symlink_to(runs_dir / "outside", target_is_directory=True)
    image = sorted((class_folder / "val").rglob("*.png"))[0]
    status, answer = _ask(server, name, image)
    assert status == 404, answer
    assert "no model named" in answer["error"] or "Not Found" in answer["error"]


def test_a_damaged_run_answers_one_clear_error_and_the_others_keep_answering(server, runs_dir, class_folder):
    damaged = runs_dir / "runs" / "damaged"
    shutil.copytree(runs_dir / "spare", damaged)
    weights = damaged / "trained_model_lora" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    image = sorted((class_folder / "val").rglob("*.png"))[0]
    results: dict[str, tuple[int, dict]] = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, _ask(server, n, image)))
               for n in ("damaged", "first")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    status, answer = results["damaged"]
    assert status == 500 and "model 'damaged' could not be loaded" in answer["error"]
    assert "truncated or damaged" in answer["error"] and "\n" not in answer["error"]
    assert results["first"][0] == 200


def test_unloaded_runs_free_adapter_slots_that_later_runs_reuse(runs_dir, class_folder):
    from visionlora.data.images import load_rgb
    from visionlora.serving.models import ModelStore, predict_together

    store = ModelStore("cpu", runs_dir / "runs", max_loaded=2)
    images = sorted((class_folder / "val").rglob("*.png"))[:2]
    pixels = [load_rgb(path.read_bytes()) for path in images]
    for name in ("second", "variant0", "variant1", "variant2", "second"):
        served = store.load(name)  # held until released
        assert_nested_close(predict_together([served] * 2, pixels), visionlora.load(runs_dir / "runs" / name).predict(
            images), where=name)
        store.release(served)
    (base,) = store.bases.values()
    assert len(base.slots.tensors) == 3  # two held, one made while both were held; the rest reused them
    assert len(store.models) == 2
    store.release(store.load("three"))  # a 3-class head: a base of its own, sharing the 4-class base's weights
    four, three = (next(b for b in store.bases.values() if b.key[2] == size) for size in (4, 3))
    shared = [name for name, weight in three.weights.items() if four.weights.get(name) is weight]
    assert len(shared) == len(three.weights) - 2  # all but the head's weight and bias
