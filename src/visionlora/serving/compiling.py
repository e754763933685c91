"""``serve --compile``: ``torch.compile`` on a served model, warmed up before it serves.

The model is compiled in place (``nn.Module.compile``: peft's adapters and the mixed-batch hooks stay
where they are) and warmed up on generated images at batch sizes 1 and 2, so that the compiles of a
fixed and of a dynamic batch size happen at load, not in the first requests.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from visionlora.deploy.precision import generated_images, raw_outputs
from visionlora.tasks.base import ModelInfo, Task

WARMUP_BATCHES = (1, 2)


def compile_served(model: torch.nn.Module, task: Task, processor: Any, info: ModelInfo) -> float:
    """Compile ``model`` in place and warm it up; the warm-up's seconds."""
    started = time.perf_counter()
    model.compile()
    images = generated_images(max(WARMUP_BATCHES))
    for size in WARMUP_BATCHES:
        raw_outputs(task, processor, info, model, images[:size])
    return time.perf_counter() - started
