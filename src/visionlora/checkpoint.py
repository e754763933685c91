"""Resumable training state in ``<run>/checkpoint/``, written atomically.

    trainable.safetensors  trained weights and all buffers (the frozen base is rebuilt)
    best.safetensors       the best epoch's trained weights so far
    state.pt               optimizer and scheduler state and the torch RNG (loaded weights-only)
    progress.json          epoch, batches done, history, best epoch and metrics, the run's settings
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from visionlora.artifacts import atomic_dir, atomic_write_json, read_json
from visionlora.errors import VisionLoraError

CHECKPOINT_DIR = "checkpoint"


@dataclass
class Progress:
    """Where a run stands; enough, with the weights and optimizer, to continue exactly."""

    completed_epochs: int = 0
    batches_done: int = 0  # in epoch completed_epochs + 1
    loss_total: float = 0.0  # of the batches done in the current epoch
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_value: float | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    stale_epochs: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(run_root: Path) -> Path:
    return Path(run_root) / CHECKPOINT_DIR


def save_checkpoint(run_root: Path, trained: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None,
                    optimizer, scheduler, progress: Progress) -> None:
    """Write the whole training state; the previous checkpoint stays until this one is complete."""
    with atomic_dir(checkpoint_dir(run_root)) as tmp:
        save_file(_contiguous(trained), str(tmp / "trainable.safetensors"))
        if best is not None:
            save_file(_contiguous(best), str(tmp / "best.safetensors"))
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, tmp / "state.pt")
        atomic_write_json(tmp / "progress.json", asdict(progress))


def read_progress(run_root: Path) -> Progress:
    path = checkpoint_dir(run_root) / "progress.json"
    if not path.is_file():
        raise VisionLoraError(f"{run_root}: nothing to resume (no {CHECKPOINT_DIR}/progress.json)")
    data = read_json(path)
    return Progress(**{k: v for k, v in data.items() if k in Progress.__dataclass_fields__})


def load_checkpoint(run_root: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(trained weights, best weights or None, optimizer/scheduler/RNG state); tensors only, no pickled code."""
    folder = checkpoint_dir(run_root)
    try:
        trained = load_file(str(folder / "trainable.safetensors"))
        best = load_file(str(folder / "best.safetensors")) if (folder / "best.safetensors").is_file() else None
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, json.JSONDecodeError) as err:
        raise VisionLoraError(f"{folder}: checkpoint is unreadable ({str(err).splitlines()[0]})") from None
    return trained, best, state


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in tensors.items()}
