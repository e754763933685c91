"""Experiment tracking through Accelerate's trackers: ``--report-to tensorboard,mlflow,wandb``.

Each optimizer step logs ``train/loss`` and ``train/lr``; each epoch logs ``epoch/train_loss``
and every scalar validation metric as ``val/<name>``, at the optimizer step it ended on. The
settings are stored as hyperparameters. Trackers write under the run folder's ``tracking/``
unless their own environment variables (``MLFLOW_TRACKING_URI``, ``WANDB_DIR``) say otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from visionlora.errors import VisionLoraError

PROJECT = "visionlora"


def hyperparameters(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as trackers store them: numbers, strings and booleans only."""
    return {key: value if isinstance(value, (bool, int, float, str)) else
            ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            for key, value in settings.items()}


def start(accelerator, names: list[str], settings: dict[str, Any], folder: Path) -> None:
    """Start the trackers of ``names`` on ``accelerator``, writing under ``folder``."""
    if not names:
        return
    folder.mkdir(parents=True, exist_ok=True)
    accelerator.project_configuration.set_directories(str(folder))
    accelerator.project_configuration.logging_dir = str(folder)
    if "mlflow" in names and "MLFLOW_TRACKING_URI" not in os.environ:
        import mlflow

        # a local file store beside the run; MLflow 3 asks for this opt-in to write one
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
    init = {"wandb": {"dir": os.environ.get("WANDB_DIR", str(folder)), "name": folder.parent.name}}
    try:
        accelerator.init_trackers(PROJECT, config=hyperparameters(settings), init_kwargs=init)
    except Exception as err:  # each tracker library raises its own types
        accelerator.trackers.clear()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VisionLoraError(f"--report-to {','.join(names)}: a tracker did not start: {first}") from None


def log_step(accelerator, loss: float, lr: float, step: int) -> None:
    accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)


def log_epoch(accelerator, row: dict[str, Any], step: int) -> None:
    """An epoch's history row: its train loss and scalar validation metrics."""
    values = {"epoch/train_loss": row["train_loss"], "epoch/epoch": row["epoch"]}
    values.update({f"val/{key[4:]}": value for key, value in row.items()
                   if key.startswith("val_") and isinstance(value, (int, float)) and not isinstance(value, bool)})
    accelerator.log(values, step=step)
