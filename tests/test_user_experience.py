"""What a user meets first: a quiet default run, readable files, a quick --help, evaluation on its own split."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import visionlora
from tests.conftest import tiny_config
from visionlora.cli import main
from visionlora.examples.synthetic import make_classification_folder
from visionlora.training.engine import train


def _cli(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionlora", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, cwd=cwd)


def test_a_default_run_prints_no_library_warnings(vit_hub_home, class_folder, tmp_path):
    # No --model: the preset's hub id, loaded offline from the cache as a download would be.
    completed = _cli(["train", "--data", str(class_folder), "--epochs", "1", "--output", str(tmp_path / "run")],
                     env={"HF_HOME": str(vit_hub_home), "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    printed = completed.stdout + completed.stderr
    assert "model google/vit-base-patch16-224" in printed
    for word in ("warn", "Warning", "deprecated", "Could not find"):
        assert word not in printed, printed
    log = (tmp_path / "run" / "training_results_lora" / "train.log").read_text()
    assert "Could not find a config file" in log  # peft's note, kept for whoever wants it


def test_run_files_are_readable_as_the_umask_says(class_folder, tmp_path):
    previous = os.umask(0o022)
    try:
        result = train(tiny_config("classification", class_folder, tmp_path / "run", epochs=1))
    finally:
        os.umask(previous)
    files = [p for p in result.paths.root.rglob("*") if p.is_file()]
    assert len(files) > 8
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for path in [p for p in result.paths.root.rglob("*") if p.is_dir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path


def test_evaluate_reads_only_the_validation_images(tmp_path):
    data = make_classification_folder(tmp_path / "data", per_class_train=6, per_class_val=3)
    result = train(tiny_config("classification", data, tmp_path / "run", epochs=1))
    shutil.move(data / "train", tmp_path / "moved-away")
    evaluated = visionlora.load(result.paths.root).evaluate()
    assert evaluated["images"] == 12
    assert evaluated["metrics"]["accuracy"] == pytest.approx(result.summary["metrics"]["accuracy"])


def test_top_level_help_does_not_import_torch():
    code = ("import sys\nfrom visionlora.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "usage: visionlora" in completed.stdout
    assert completed.stdout.strip().endswith("torch not loaded"), completed.stdout[-500:]


def test_an_option_of_another_task_is_a_clear_error(class_folder, tmp_path, capsys):
    result = train(tiny_config("classification", class_folder, tmp_path / "run", epochs=1))
    image = next((class_folder / "val").rglob("*.png"))
    capsys.readouterr()
    assert main(["predict", str(result.paths.root), str(image), "--threshold", "0.3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --threshold is a detection option; {result.paths.root} is a classification run"
    ]


def test_metrics_plot_has_whole_epochs_and_unit_axes(class_folder, tmp_path):
    from PIL import Image

    result = train(tiny_config("classification", class_folder, tmp_path / "run", epochs=3))
    with Image.open(result.paths.metrics_plot) as plot:
        assert plot.info.get("dpi", (0, 0))[0] == pytest.approx(200, abs=1)
    history = (result.paths.history).read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2", "3"]
    summary = json.loads(result.paths.summary.read_text())
    assert summary["completed"] is True
