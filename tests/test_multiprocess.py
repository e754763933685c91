"""Two CPU processes through torchrun: one set of artifacts, sharded evaluation equal to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import visionlora


def test_two_process_training_writes_once_and_evaluates_like_one(class_folder, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "visionlora", "train", "--data", str(class_folder), "--model", "tiny", "--epochs", "2",
               "--lr", "1e-3", "--batch-size", "5", "--no-progress", "--output", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("saved ") == 1  # only the main process writes
    assert sorted(p.name for p in run.iterdir()) == ["base_model", "trained_model_lora", "training_results_lora"]

    summary = json.loads((run / "training_results_lora" / "training_summary.json").read_text())
    assert summary["data"]["counts"]["val"] == 24  # 24 images over 2 processes in batches of 5: uneven shards
    single = visionlora.load(run).evaluate()["metrics"]
    assert single["accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
    assert single["macro_f1"] == pytest.approx(summary["metrics"]["macro_f1"])
    assert single["per_class_accuracy"] == pytest.approx(summary["metrics"]["per_class_accuracy"])
