"""Resume after SIGKILL, atomic run folders, incomplete runs, divergence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from visionlora.cli import main
from visionlora.errors import VisionLoraError
from visionlora.training.checkpoint import read_progress
from visionlora.training.engine import train

HELPER = Path(__file__).with_name("kill_during_training.py")


def _train_args(data: Path, output: Path) -> list[str]:
    return ["train", "--data", str(data), "--model", "tiny", "--epochs", "3", "--lr", "1e-3", "--batch-size", "8",
            "--save-every", "3", "--lora-dropout", "0.1", "--no-progress", "--output", str(output)]


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights_and_metrics(class_folder, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(_train_args(class_folder, straight)) == 0

    # 64 images / 8 = 8 batches an epoch; checkpoints after steps 3, 6, 8 (epoch end), 9, 12.
    completed = subprocess.run([sys.executable, str(HELPER), "14", *_train_args(class_folder, killed)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == -9, completed.stderr[-2000:]
    progress = read_progress(killed)
    assert (progress.completed_epochs, progress.batches_done, progress.global_step) == (1, 4, 12)
    assert not (killed / "trained_model_lora").exists()
    assert main(["evaluate", str(killed)]) == 2  # an unfinished run says so

    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    a = json.loads((straight / "training_results_lora" / "training_summary.json").read_text())
    b = json.loads((killed / "training_results_lora" / "training_summary.json").read_text())
    # The same computation in the same order with the same threads: exactly the same numbers.
    assert b["best_epoch"] == a["best_epoch"] and b["metrics"] == a["metrics"]
    history_a = (straight / "training_results_lora" / "history.csv").read_text().splitlines()
    history_b = (killed / "training_results_lora" / "history.csv").read_text().splitlines()
    without_seconds = lambda lines: [line.rsplit(",", 1)[0] for line in lines]  # noqa: E731
    assert without_seconds(history_b) == without_seconds(history_a)
    weights_a = load_file(str(straight / "trained_model_lora" / "adapter_model.safetensors"))
    weights_b = load_file(str(killed / "trained_model_lora" / "adapter_model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    assert not (killed / "checkpoint").exists()  # cleaned up once complete


def test_resume_refuses_other_settings_and_finished_runs(class_folder, tmp_path, capsys):
    run = tmp_path / "run"
    completed = subprocess.run([sys.executable, str(HELPER), "10", *_train_args(class_folder, run)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == -9
    assert main(["train", "--resume", str(run), "--lr", "0.5"]) == 2
    assert "--lr 0.5 (the run used 0.001)" in capsys.readouterr().err
    # how to run may change on resume, and is then used: here the disk cache
    cache = tmp_path / "cache"
    assert main(["train", "--resume", str(run), "--no-progress", "--cache", "disk", "--cache-dir", str(cache)]) == 0
    summary = json.loads((run / "training_results_lora" / "training_summary.json").read_text())
    assert summary["data"]["cache"]["mode"] == "disk" and summary["data"]["cache"]["location"] == str(cache)
    assert len(list(cache.rglob("*.safetensors"))) == 64 + 24  # every training and validation image
    assert main(["train", "--resume", str(run)]) == 2
    assert "already completed" in capsys.readouterr().err


def test_nothing_to_resume_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_a_failed_start_leaves_no_run_folder(tmp_path):
    empty = tmp_path / "data"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(VisionLoraError, match="holds no images"):
        train(tiny_config("classification", empty, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_diverging_training_stops_with_a_message_and_keeps_the_checkpoint(class_folder, tmp_path, monkeypatch):
    from visionlora.tasks.classification.task import ClassificationSteps

    calls = {"n": 0}
    original = ClassificationSteps.loss

    def nan_after_first_epoch(self, model, batch, info):
        calls["n"] += 1
        loss = original(self, model, batch, info)
        return loss * float("nan") if calls["n"] > 9 else loss

    monkeypatch.setattr(ClassificationSteps, "loss", nan_after_first_epoch)
    with pytest.raises(VisionLoraError,
                       match=r"training diverged: loss is nan at epoch 2, batch 2; "
                             r"the last good checkpoint is kept in"):
        train(tiny_config("classification", class_folder, tmp_path / "run", epochs=3, save_every=0))
    assert read_progress(tmp_path / "run").completed_epochs == 1
    assert not (tmp_path / "run" / "trained_model_lora").exists()


def test_low_memory_setting_gives_identical_results(class_folder, tmp_path):
    plain = train(tiny_config("classification", class_folder, tmp_path / "plain", epochs=1))
    lean = train(tiny_config("classification", class_folder, tmp_path / "lean", epochs=1, low_memory=True))
    assert lean.summary["metrics"] == plain.summary["metrics"]
    a, b = plain.model.state_dict(), lean.model.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_an_adapter_whose_local_base_changed_is_refused(class_folder, tmp_path, capsys):
    base = train(tiny_config("classification", class_folder, tmp_path / "pretrain", mode="full", epochs=1))
    base_dir = base.paths.model_dir
    run = train(tiny_config("classification", class_folder, tmp_path / "run", epochs=1, model=str(base_dir))).paths.root
    image = str(next((class_folder / "val").rglob("*.png")))
    assert main(["predict", str(run), image]) == 0
    capsys.readouterr()
    from safetensors.torch import load_file, save_file

    weights = base_dir / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0  # someone retrained or replaced the base
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert main(["predict", str(run), image]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "the base model changed since the adapter was trained" in lines[0]
    assert "--allow-base-change" in lines[0]
    assert main(["predict", str(run), image, "--allow-base-change"]) == 0
