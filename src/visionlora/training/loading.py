"""How training feeds its batches: worker processes, pinned memory, non-blocking copies, prefetch.

``--num-workers auto`` (the default) fits the device:

- on CUDA, one worker per core this process may use, less one for the training loop
  itself (at most ``MAX_WORKERS``); batches are pinned and copied to the device without
  blocking; workers persist between epochs and each keeps ``CUDA_PREFETCH`` batches ready;
- on a CPU, none: the model's forward and backward already use every core, so workers
  only take cores from them (``benchmarks/input_pipeline.py`` measures both).

A number of workers given by hand keeps the device's pinning and copies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from visionlora.data.batches import PooledCollate

MAX_WORKERS = 8
CUDA_PREFETCH = 4
HELD_BATCHES = 3  # batches the training loop may hold at once (in use, prefetched by Accelerate, pinning)


@dataclass(frozen=True)
class LoaderPlan:
    """The data loading a run uses, and why."""

    workers: int
    pin_memory: bool
    prefetch_factor: int | None
    reason: str

    @property
    def non_blocking(self) -> bool:
        """Copies to the device overlap compute only from pinned memory."""
        return self.pin_memory

    def loader(self, dataset, collate: Callable[[list[Any]], Any], **kwargs) -> torch.utils.data.DataLoader:
        """A DataLoader of ``dataset`` as planned; workers hand their batches over in reused shared memory."""
        if self.workers == 0:
            return torch.utils.data.DataLoader(dataset, collate_fn=collate, pin_memory=self.pin_memory, **kwargs)
        slots = (self.prefetch_factor or 2) + HELD_BATCHES
        return torch.utils.data.DataLoader(
            dataset, collate_fn=PooledCollate(collate, self.workers, slots), num_workers=self.workers,
            pin_memory=self.pin_memory, persistent_workers=True, prefetch_factor=self.prefetch_factor, **kwargs)

    def describe(self) -> str:
        """One line for the start of a run."""
        if self.workers:
            parts = [f"{self.workers} workers (persistent, {self.prefetch_factor} batches ahead each)"]
        else:
            parts = ["in the training process"]
        if self.pin_memory:
            parts.append("pinned memory, non-blocking copies")
        return f"data loading: {', '.join(parts)} ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "pin_memory": self.pin_memory, "non_blocking": self.non_blocking,
                "persistent_workers": self.workers > 0, "prefetch_factor": self.prefetch_factor,
                "reason": self.reason}


def usable_cores() -> int:
    """The cores this process may run on (its affinity, as a container or ``taskset`` sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_loading(requested: str | int, device: torch.device, processes_here: int = 1) -> LoaderPlan:
    """The loader for ``--num-workers requested`` on ``device``, with ``processes_here`` training
    processes sharing this machine's cores."""
    cuda = device.type == "cuda"
    cores = max(1, usable_cores() // max(processes_here, 1))
    if str(requested) != "auto":
        workers = int(requested)
        return LoaderPlan(workers, cuda, (CUDA_PREFETCH if cuda else 2) if workers else None,
                          f"--num-workers {workers}")
    if cuda:
        workers = max(1, min(MAX_WORKERS, cores - 1))
        return LoaderPlan(workers, True, CUDA_PREFETCH, f"auto: CUDA, {cores} cores for this process")
    return LoaderPlan(0, False, None, f"auto: {device.type}, whose {cores} cores the model's own steps use")
