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

from visionlora.artifacts import RunPaths, atomic_dir, atomic_write_json, read_json
from visionlora.config import TrainConfig
from visionlora.errors import VisionLoraError

# Settings that may differ when a run is resumed: they change how it is shown or loaded only.
RESUME_FREE = {"output", "overwrite", "progress", "num_workers", "cache", "cache_dir", "report_to", "device"}


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


def save_checkpoint(paths: RunPaths, trained: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None,
                    optimizer, scheduler, progress: Progress) -> None:
    """Write the whole training state; the previous checkpoint stays until this one is complete."""
    with atomic_dir(paths.checkpoint_dir) as tmp:
        save_file(_contiguous(trained), str(tmp / "trainable.safetensors"))
        if best is not None:
            save_file(_contiguous(best), str(tmp / "best.safetensors"))
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, tmp / "state.pt")
        atomic_write_json(tmp / paths.progress_file.name, asdict(progress))


def read_progress(run_root: Path) -> Progress:
    path = RunPaths(Path(run_root), "lora").progress_file
    if not path.is_file():
        raise VisionLoraError(f"{run_root}: nothing to resume (no {path.parent.name}/{path.name})")
    data = read_json(path)
    return Progress(**{k: v for k, v in data.items() if k in Progress.__dataclass_fields__})


def load_checkpoint(paths: RunPaths) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(trained weights, best weights or None, optimizer/scheduler/RNG state); tensors only, no pickled code."""
    folder = paths.checkpoint_dir
    try:
        trained = load_file(str(folder / "trainable.safetensors"))
        best = load_file(str(folder / "best.safetensors")) if (folder / "best.safetensors").is_file() else None
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, json.JSONDecodeError) as err:
        raise VisionLoraError(f"{folder}: checkpoint is unreadable ({str(err).splitlines()[0]})") from None
    return trained, best, state


def restore_cuda_rng(states: list[torch.Tensor]) -> str | None:
    """Put back the saved CUDA generators' states, those of the GPUs this machine has; a note (else None)
    when the checkpoint was written with another number of GPUs."""
    count = torch.cuda.device_count()
    for index, state in enumerate(states[:count]):
        torch.cuda.set_rng_state(state, index)
    if len(states) == count:
        return None
    return (f"the checkpoint holds the random state of {len(states)} GPUs and this machine has {count}: "
            f"restored {min(len(states), count)}, so random numbers on the GPU differ from an uninterrupted run's")


def resume_settings(root: Path, settings: dict[str, Any]) -> tuple[TrainConfig, Progress]:
    """The run's saved settings and progress; ``settings`` given now must agree with them."""
    for mode in ("lora", "full"):
        if RunPaths(root, mode).completed():
            raise VisionLoraError(f"{root}: this run already completed; nothing to resume")
    progress = read_progress(root)
    saved = TrainConfig.from_dict(progress.config)
    differing = [
        f"--{k.replace('_', '-')} {v!r} (the run used {getattr(saved, k)!r})"
        for k, v in settings.items()
        if k not in RESUME_FREE and v is not None and v != getattr(saved, k)
    ]
    if differing:
        raise VisionLoraError(f"{root}: --resume continues with the run's own settings, "
                              f"but these differ: {'; '.join(differing)}")
    saved.output = str(root)
    for key in sorted(RESUME_FREE - {"output", "overwrite"}):  # how to run, not what to train: as given now
        if settings.get(key) is not None:
            setattr(saved, key, settings[key])
    return saved, progress


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in tensors.items()}
