"""Training's device paths, checked without a GPU: models on the ``meta`` device (where any tensor
made on the CPU stands out), fake CUDA tensors, and ``torch.cuda`` functions faked as a GPU host has them."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import tiny_config
from tests.test_input_pipeline import Images, collate
from visionlora.data.batches import PooledCollate, _descriptors
from visionlora.runtime import resolve_precision
from visionlora.tasks import get_task
from visionlora.training import engine
from visionlora.training.checkpoint import Progress
from visionlora.training.engine import TrainingLoop


class Recorder:
    """A stand-in for a function: remembers each call's arguments, returns ``result``."""

    def __init__(self, result=None):
        self.calls: list[tuple] = []
        self.result = result

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        return self.result


class StubAccelerator:
    """What the engine asks of an Accelerator here: its device, prepare, unwrap_model and print."""

    def __init__(self, device: str = "cpu", model: torch.nn.Module | None = None):
        self.device = torch.device(device)
        self.model = model
        self.prepared: list = []
        self.printed: list[str] = []

    def prepare(self, value):
        self.prepared.append(value)
        return value

    def unwrap_model(self, model):
        return self.model

    def print(self, text: str) -> None:
        self.printed.append(text)


def frozen_model() -> torch.nn.Module:
    """Two frozen linear layers (what a LoRA base's weights are) and a trainable head."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    for layer in model[:2]:
        layer.requires_grad_(False)
    return model


@pytest.mark.parametrize("on_disk", [False, True], ids=["in-memory", "low-memory-file"])
def test_frozen_weights_restored_on_bf16_come_back_on_the_device_training_ran_on(tmp_path, on_disk):
    """Lowered to bf16 on the CPU, then moved to the accelerator by ``prepare``: the fp32 originals
    must return onto the accelerator, not where they waited (the CPU's memory, or a file with --low-memory)."""
    model = frozen_model()
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    file = tmp_path / "frozen.safetensors"
    frozen = engine.FrozenOriginals(model, file if on_disk else None)
    assert model[0].weight.dtype == torch.bfloat16 and file.is_file() == on_disk
    model.to("meta")  # as accelerator.prepare moves it to the GPU
    frozen.restore(model)
    placed = {name: (p.device.type, p.dtype) for name, p in model.named_parameters()}
    assert placed == {name: ("meta", torch.float32) for name in expected}, placed
    assert not file.exists()


@pytest.mark.parametrize("on_disk", [False, True], ids=["in-memory", "low-memory-file"])
def test_the_restored_weights_are_the_fp32_originals(tmp_path, on_disk):
    model = frozen_model()
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    frozen = engine.FrozenOriginals(model, tmp_path / "frozen.safetensors" if on_disk else None)
    frozen.restore(model)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, expected[name]), name
        assert parameter.requires_grad == (name.startswith("2.")), name


def test_full_precision_for_a_while_then_bf16_again():
    """A packed job's end runs over the fp32 originals; the pack then trains on over the same bf16 weights."""
    model = frozen_model()
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    frozen = engine.FrozenOriginals(model, None)
    lowered = model[0].weight
    with frozen.in_full_precision(model):
        assert all(torch.equal(p, expected[n]) and p.dtype == torch.float32 for n, p in model.named_parameters())
    assert model[0].weight.data_ptr() == lowered.data_ptr() and model[1].weight.dtype == torch.bfloat16


def test_init_from_evaluates_on_the_device_training_runs_on(monkeypatch):
    """The model of ``--init-from`` is loaded on the CPU; its first evaluation must run on the
    accelerator's device, with the loader prepared (batches placed there, shared across processes)."""
    seen = {}

    def fake_evaluate(task, model, processor, loader, accelerator, info):
        seen["devices"] = {p.device.type for p in model.parameters()}
        seen["loader"] = loader
        return {"accuracy": 0.5}

    monkeypatch.setattr(engine, "evaluate", fake_evaluate)
    accelerator = StubAccelerator("meta")
    task = get_task("classification")
    metrics = engine._evaluate_once(task, frozen_model(), None, [], accelerator, None, 4)
    assert metrics == {"accuracy": 0.5}
    assert seen["devices"] == {"meta"}
    assert seen["loader"] in accelerator.prepared


def resuming_loop(checkpoint_state: dict, monkeypatch) -> tuple[TrainingLoop, StubAccelerator]:
    """A training loop just far enough along to restore a checkpoint holding ``checkpoint_state``."""
    accelerator = StubAccelerator(model=torch.nn.Linear(2, 2))
    loop = TrainingLoop.__new__(TrainingLoop)
    loop.accelerator, loop.paths, loop.kept_names, loop.model = accelerator, None, set(), None
    loop.optimizer = SimpleNamespace(load_state_dict=Recorder())
    loop.scheduler = SimpleNamespace(scheduler=SimpleNamespace(load_state_dict=Recorder()))
    monkeypatch.setattr(engine, "load_checkpoint", lambda paths: ({}, None, checkpoint_state))
    return loop, accelerator


@pytest.mark.parametrize("gpus_now", [1, 3])
def test_resume_with_another_number_of_gpus_restores_those_there_are_and_says_so(monkeypatch, gpus_now):
    """A checkpoint from 2 GPUs: on 1 GPU, setting GPU 1's generator would fail (no such device)."""
    saved = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    restored: dict[int, torch.Tensor] = {}

    def set_rng_state(state, device=0):
        if not 0 <= int(device) < gpus_now:
            raise RuntimeError("CUDA error: invalid device ordinal")
        restored[int(device)] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus_now)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    state = {"optimizer": {}, "scheduler": {}, "torch_rng": torch.get_rng_state(), "cuda_rng": saved}
    loop, accelerator = resuming_loop(state, monkeypatch)
    loop.restore(Progress(completed_epochs=1))
    assert sorted(restored) == list(range(min(2, gpus_now)))
    assert all(restored[index] is saved[index] for index in restored)
    notes = [line for line in accelerator.printed if "random state of 2 GPUs" in line]
    assert len(notes) == 1 and f"this machine has {gpus_now}" in notes[0], accelerator.printed
    assert loop.state.completed_epochs == 1


def test_resume_on_as_many_gpus_restores_all_without_a_note(monkeypatch):
    saved = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    restored = Recorder()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", restored)
    state = {"optimizer": {}, "scheduler": {}, "torch_rng": torch.get_rng_state(), "cuda_rng": saved}
    loop, accelerator = resuming_loop(state, monkeypatch)
    loop.restore(Progress())
    assert [index for _, index in restored.calls] == [0, 1]
    assert accelerator.printed == []


def loop_on_a_gpu() -> TrainingLoop:
    """A training loop whose model lies on a (fake) CUDA device; call within a ``FakeTensorMode``."""
    model = torch.nn.Linear(4, 2, device="meta")
    model.weight = torch.nn.Parameter(torch.empty(2, 4, device="cuda"))
    model.bias = torch.nn.Parameter(torch.empty(2, device="cuda"))
    loop = TrainingLoop.__new__(TrainingLoop)
    loop.accelerator = StubAccelerator("cuda", model)
    loop.model, loop.kept_names = model, {"weight", "bias"}
    loop.task, loop.state, loop.best_state = get_task("classification"), Progress(), None
    return loop


def test_the_best_weights_are_kept_on_the_cpu_not_in_gpu_memory():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        loop = loop_on_a_gpu()
        assert loop.model.weight.device.type == "cuda"
        assert loop._track_best(1, {loop.task.main_metric: 0.5})
    assert loop.best_state is not None and set(loop.best_state) == {"weight", "bias"}
    assert {t.device.type for t in loop.best_state.values()} == {"cpu"}


def test_checkpoint_weights_are_copied_to_the_cpu_not_cloned_on_the_gpu(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    written = {}

    def save_checkpoint(paths, trained, best, optimizer, scheduler, progress):
        written["trained"] = {name: t.device.type for name, t in trained.items()}

    monkeypatch.setattr(engine, "save_checkpoint", save_checkpoint)
    with FakeTensorMode():
        loop = loop_on_a_gpu()
        loop.accelerator.is_main_process = True
        loop.accelerator.wait_for_everyone = lambda: None
        loop.paths = loop.optimizer = loop.scheduler = None
        loop._save_checkpoint()
    assert written["trained"] == {"weight": "cpu", "bias": "cpu"}


def test_a_run_resets_the_gpus_peak_memory_count_at_its_start(monkeypatch, class_folder, tmp_path):
    """Two runs in one process (demo, compare): the second's summary must not report the first's peak."""
    accelerator = engine.new_accelerator(cpu=True)
    resets = Recorder()
    monkeypatch.setattr(engine, "new_accelerator", lambda **settings: accelerator)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets)

    class Stop(Exception):
        pass

    def stop_before_training(*args, **kwargs):
        assert len(resets.calls) == 1, "the peak is reset before the run's first step"
        raise Stop

    monkeypatch.setattr(engine, "_train_in", stop_before_training)
    with pytest.raises(Stop):
        engine.train(tiny_config("classification", class_folder, tmp_path / "run"))
    assert len(resets.calls) == 1


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_bf16_asked_for_on_a_gpu_without_native_bf16_says_it_is_emulated(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    precision, why = resolve_precision("bf16")
    assert precision == "bf16"
    assert "Tesla T4" in why and "emulated" in why and "7.5" in why, why
    assert "\n" not in why


@pytest.mark.parametrize("requested", ["bf16", "fp16", "no"])
def test_precision_asked_for_on_a_gpu_with_native_bf16_comes_without_a_note(monkeypatch, requested):
    fake_gpu(monkeypatch, "NVIDIA A100", (8, 0))
    assert resolve_precision(requested) == (requested, "asked for with --mixed-precision")


def test_fp16_asked_for_on_an_older_gpu_comes_without_a_note(monkeypatch):
    fake_gpu(monkeypatch, "Tesla V100", (7, 0))
    assert resolve_precision("fp16") == ("fp16", "asked for with --mixed-precision")


def test_a_thread_that_copies_each_batch_and_drops_it_hands_the_slots_back():
    """As DataLoader's pin-memory thread does (``batch = pin(batch)``): the batch read from the
    worker is copied and dropped in that thread; its slot must go back to the worker, while the
    copies are still in use."""
    dataset = Images()
    expected = list(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate))
    pooled = PooledCollate(collate, workers=1, slots=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=pooled, num_workers=1,
                                         persistent_workers=True, prefetch_factor=2)
    copies: queue.Queue = queue.Queue()

    def pin_like() -> None:
        for batch in loader:
            batch = {key: value.clone() for key, value in batch.items()}  # the original dropped here
            copies.put(batch)
        copies.put(None)

    for _ in range(2):  # the second epoch finds the slots free again
        thread = threading.Thread(target=pin_like)
        thread.start()
        held = list(iter(copies.get, None))
        thread.join()
        assert [key for key in _descriptors if key[0] == pooled.key], "the batches came through the slots"
        assert int((pooled.claims != 0).sum()) == 0, "every slot is back while the copies are still held"
        for got, want in zip(held, expected, strict=True):
            for key in want:
                assert torch.equal(got[key], want[key]), key
