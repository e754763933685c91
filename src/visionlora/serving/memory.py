"""Running out of accelerator memory while serving: the error a request is answered with, and the
allocator's cache handed back before a retry."""

from __future__ import annotations

import torch

from visionlora.errors import VisionLoraError

RETRY_AFTER_S = 5  # the Retry-After of an answer refused for want of memory


class OutOfMemory(VisionLoraError):
    """The accelerator's memory ran out: an image that does not fit even alone, or a model being loaded.

    The server answers the request 503 with ``Retry-After`` and keeps serving.
    """


def free_cached_memory() -> None:
    """Hand the memory that CUDA's allocator caches back to the device (nothing without CUDA), so that
    a retry (or another model) finds it."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
