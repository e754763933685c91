"""Shared fixtures: generated image sets and a quick tiny-model config."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)

from visionlora.config import TrainConfig  # noqa: E402
from visionlora.synthetic import make_classification_folder  # noqa: E402
from visionlora.tasks import get_task  # noqa: E402

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def class_folder(tmp_path_factory) -> Path:
    """4 colour classes, 16 train and 6 val images each (train/ and val/ layout)."""
    return make_classification_folder(tmp_path_factory.mktemp("classes"), per_class_train=16, per_class_val=6)


def tiny_config(task: str, data: Path, output: Path, mode: str = "lora", **overrides) -> TrainConfig:
    """The task preset with a tiny model, a short schedule and a learning rate for random weights."""
    settings = get_task(task).preset.settings(mode)
    settings.update(model="tiny", lr=1e-3)
    values = dict(task=task, data=str(data), mode=mode, epochs=2, batch_size=8, output=str(output), progress=False)
    values.update(settings)
    values.update(overrides)
    return TrainConfig(**values).validate()


def read_data(task: str, data: str, val_data: str | None = None, seed: int = 0, val_fraction: float | None = None):
    """A task's training and validation records of ``data`` (annotations only), as training reads them."""
    cfg = TrainConfig(task=task, data=data, val_data=val_data, seed=seed, val_fraction=val_fraction)
    return get_task(task).read_data(cfg)


def fill_hub_cache(hf_home: Path, repo_id: str, model, processor, revision: str = "0" * 40) -> Path:
    """Save ``model`` and ``processor`` where the Hugging Face hub cache keeps ``repo_id``,
    so that ``from_pretrained(repo_id)`` with ``HF_HUB_OFFLINE=1`` loads them as a download would."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    model.save_pretrained(snapshot)
    processor.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(scope="session")
def vit_hub_home(tmp_path_factory) -> Path:
    """An HF_HOME whose cache holds a small ViT under the classification preset's hub id."""
    from visionlora.builtin_models import tiny_vit

    home = tmp_path_factory.mktemp("hf_home")
    model, processor = tiny_vit(["a", "b"], 32)
    fill_hub_cache(home, get_task("classification").preset.model, model, processor)
    return home
