"""``visionlora tune``: successive halving over LoRA settings, each rung's trials trained packed; the
leaderboard, the plot, the best run (the only one that sees the test part), and resume."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from visionlora.artifacts import RunPaths
from visionlora.cli import main
from visionlora.examples.synthetic import make_classification_folder
from visionlora.training.tune import rung_epochs

KILLER = Path(__file__).with_name("kill_during_training.py")


def _tune_args(data: Path, output: Path, space: Path) -> list[str]:
    return ["tune", "--data", str(data), "--output", str(output), "--trials", "4", "--eta", "2", "--epochs", "2",
            "--space", str(space), "--model", "tiny-pretrained", "--mixed-precision", "no", "--no-progress",
            "--save-every", "1"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(data, space file, output, printed lines) of one tune of 4 trials over a dataset with a test part."""
    root = tmp_path_factory.mktemp("tune")
    data = make_classification_folder(root / "data", per_class_train=4, per_class_val=3, seed=5)
    shutil.copytree(data / "val", data / "test")
    space = root / "space.yaml"
    space.write_text("lora_r: [4, 8]\nlr: {low: 0.0005, high: 0.005}\n")
    output = root / "tune"
    result = subprocess.run([sys.executable, "-m", "visionlora", *_tune_args(data, output, space)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return data, space, output, result.stdout


def _leaderboard(output: Path) -> dict[str, dict[str, str]]:
    with (output / "leaderboard.csv").open() as handle:
        return {row["trial"]: row for row in csv.DictReader(handle)}


def test_rungs_halve_the_trials_and_lengthen_their_training():
    assert rung_epochs(epochs=9, trials=16, eta=3) == [1, 3, 9]
    assert rung_epochs(epochs=2, trials=4, eta=2) == [1, 2]
    assert rung_epochs(epochs=1, trials=8, eta=2) == [1]


def test_the_leaderboard_ranks_every_trial_within_the_given_space(tuned):
    _, _, output, printed = tuned
    rows = _leaderboard(output)
    assert list(rows) == ["trial000", "trial001", "trial002", "trial003"]
    assert rows["trial000"]["lora_r"] == "16"  # the preset itself, the baseline
    assert all(rows[t]["lora_r"] in ("4", "8") and 0.0005 <= float(rows[t]["lr"]) <= 0.005
               for t in ("trial001", "trial002", "trial003"))
    assert all(row["accuracy@1ep"] != "" for row in rows.values())  # every trial ran the first rung
    second = [t for t, row in rows.items() if row["accuracy@2ep"] != ""]
    assert len(second) == 2  # the better half went on
    first_scores = sorted(((float(r["accuracy@1ep"]), t) for t, r in rows.items()), reverse=True)
    assert min(float(rows[t]["accuracy@1ep"]) for t in second) >= first_scores[2][0]
    best = [t for t, row in rows.items() if row["status"] == "best"]
    assert len(best) == 1 and best[0] in second
    assert all(int(row["adapter_bytes"]) > 0 for row in rows.values())
    assert "preset" in printed
    assert (output / "tune.png").stat().st_size > 10_000


def test_only_the_best_run_sees_the_test_part(tuned):
    _, _, output, _ = tuned
    best = json.loads(RunPaths(output / "best", "lora").summary.read_text())
    assert best["test_metrics"] is not None
    trials = list((output / "rung1-1ep").glob("trial*/training_results_lora/training_summary.json"))
    assert len(trials) == 4 and all(json.loads(p.read_text()).get("test_metrics") is None for p in trials)
    winner = next(t for t, row in _leaderboard(output).items() if row["status"] == "best")
    settings = json.loads((output / "best" / "trained_model_lora" / "adapter_config.json").read_text())
    assert settings["r"] == int(_leaderboard(output)[winner]["lora_r"])


def test_only_the_last_rungs_runs_draw_their_figures(tuned):
    """The rungs before the last are read for their metric only; the best run is drawn in full."""
    _, _, output, _ = tuned
    first = output / "rung1-1ep"
    assert list(first.glob("trial*/training_results_lora/report.html"))
    assert not list(first.glob("trial*/training_results_lora/*.png"))
    best = output / "best" / "training_results_lora"
    assert {"loss.png", "metrics.png", "confusion_matrix.png", "predictions.png"} <= {p.name for p in best.iterdir()}


def test_a_killed_tune_resumes_to_the_same_leaderboard(tuned, tmp_path):
    data, space, uninterrupted, _ = tuned
    output = tmp_path / "tune"
    # the first rung takes 8 losses (4 trials, 2 batches each); the 11th is in the second rung
    killed = subprocess.run([sys.executable, str(KILLER), "11", *_tune_args(data, output, space)],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (output / "best").exists()
    assert main(["tune", "--resume", "--output", str(output), "--no-progress"]) == 0
    ours, theirs = _leaderboard(output), _leaderboard(uninterrupted)
    for trial, row in theirs.items():
        assert {k: ours[trial][k] for k in row} == row, trial
