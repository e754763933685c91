"""Shared fixtures: generated image sets, a quick tiny-model config, and the suite's process settings."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402

from visionlora.config import TrainConfig  # noqa: E402
from visionlora.examples.synthetic import make_classification_folder  # noqa: E402
from visionlora.runtime import resolve_precision  # noqa: E402
from visionlora.tasks import get_task  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist, each worker gets its share of the cores, and so do the processes it starts:
    more threads than cores make OpenMP's spinning threads take turns, many times slower."""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if not workers:
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def class_folder(tmp_path_factory) -> Path:
    """4 colour classes, 16 train and 6 val images each (train/ and val/ layout)."""
    return make_classification_folder(tmp_path_factory.mktemp("classes"), per_class_train=16, per_class_val=6)


@pytest.fixture(scope="session")
def served_runs(class_folder, tmp_path_factory):
    """A LoRA, a DoRA and a LoHa classification adapter on one saved base, a detection run, a pose run and
    a segmentation run (the serving tests' runs, trained once)."""
    from visionlora.examples.segmentation import make_segmentation_dataset
    from visionlora.examples.synthetic import make_detection_dataset, make_pose_dataset
    from visionlora.training.engine import train

    root = tmp_path_factory.mktemp("served")
    first = train(tiny_config("classification", class_folder, root / "ants", epochs=1)).paths.root
    second = train(tiny_config("classification", class_folder, root / "bees", epochs=2, seed=3, method="dora",
                               model=str(first / "base_model"))).paths.root
    third = train(tiny_config("classification", class_folder, root / "wasps", epochs=1, method="loha",
                              model=str(first / "base_model"))).paths.root
    boxes = make_detection_dataset(root / "boxes-data", "coco", n_train=6, n_val=2)
    detection = train(tiny_config("detection", boxes, root / "boxes", epochs=1, model="tiny-rtdetr")).paths.root
    frames = make_pose_dataset(root / "pose-data", "dlc", n_train=6, n_val=2)
    pose = train(tiny_config("pose", frames, root / "pose", epochs=1, mode="full")).paths.root
    shapes = make_segmentation_dataset(root / "regions-data", n_train=6, n_val=2, size=32)
    regions = train(tiny_config("segmentation", shapes, root / "regions", epochs=1, image_size=32)).paths.root
    return {"ants": first, "bees": second, "wasps": third, "boxes": detection, "pose": pose, "regions": regions,
            "root": root}


def tiny_config(task: str, data: Path, output: Path, mode: str = "lora", **overrides) -> TrainConfig:
    """The task preset with a tiny model, a short schedule and a learning rate for random weights."""
    settings = get_task(task).preset.settings(mode)
    settings.update(model="tiny", lr=1e-3)
    # fp32 unless a test asks otherwise: ``auto`` would train in bf16 on some CPUs and fp32 on others
    values = dict(task=task, data=str(data), mode=mode, epochs=2, batch_size=8, output=str(output), progress=False,
                  mixed_precision="no")
    values.update(settings)
    values.update(overrides)
    return TrainConfig(**values).validate()


def read_data(task: str, data: str, val_data: str | None = None, seed: int = 0, val_fraction: float | None = None):
    """A task's training and validation records of ``data`` (annotations only), as training reads them."""
    cfg = TrainConfig(task=task, data=data, val_data=val_data, seed=seed, val_fraction=val_fraction)
    return get_task(task).data.read_data(cfg)


def hub_snapshot(hf_home: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """The folder where the Hugging Face hub cache keeps ``repo_id`` at ``revision``, with the
    ``main`` ref pointing at it: what is put there loads with ``HF_HUB_OFFLINE=1`` as a download would."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def fill_hub_cache(hf_home: Path, repo_id: str, model, processor, revision: str = "0" * 40) -> Path:
    """Save ``model`` and ``processor`` in the hub cache as ``repo_id`` (see ``hub_snapshot``)."""
    snapshot = hub_snapshot(hf_home, repo_id, revision)
    model.save_pretrained(snapshot)
    processor.save_pretrained(snapshot)
    return snapshot


@pytest.fixture(scope="session")
def vit_hub_home(tmp_path_factory) -> Path:
    """An HF_HOME whose cache holds a small ViT under the classification preset's hub id."""
    from visionlora.tasks.classification.builtin import tiny_vit

    home = tmp_path_factory.mktemp("hf_home")
    model, processor = tiny_vit(["a", "b"], 32)
    fill_hub_cache(home, get_task("classification").preset.model, model, processor)
    return home


# Modules whose tests take longest, started first so that the workers finish together.
SLOW_MODULES = ("test_detection", "test_pretrained", "test_export", "test_serve", "test_detr_without_timm",
                "test_compare", "test_reliability", "test_multiprocess", "test_classification_e2e")


def pytest_collection_modifyitems(items):
    def rank(item):
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        return SLOW_MODULES.index(module) if module in SLOW_MODULES else len(SLOW_MODULES)

    items.sort(key=rank)  # stable: the order within a module is kept


NATIVE_BF16 = resolve_precision("auto")[0] == "bf16"  # where --mixed-precision auto trains in bf16
needs_native_bf16 = pytest.mark.skipif(
    not NATIVE_BF16, reason="learning quality under bf16 is checked where bf16 is native; here it is emulated")


def assert_nested_close(actual, expected, tolerance: float = 1e-4, rounding: float = 0.0, where: str = "") -> None:
    """``actual`` equals ``expected`` (nested dicts and lists), floats within ``tolerance``.

    Floats above 1 (coordinates, which outputs round to ``rounding``) may also differ by one
    rounding step. Use it where two paths may round differently: another batch composition,
    another engine (onnxruntime) or another kernel choice.
    """
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_nested_close(actual[key], expected[key], tolerance, rounding, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_nested_close(a, e, tolerance, rounding, f"{where}[{index}]")
    elif isinstance(expected, float):
        allowed = max(tolerance, rounding + 1e-6 if abs(expected) > 1 else 0.0)
        assert actual == pytest.approx(expected, abs=allowed), where
    else:
        assert actual == expected, where
