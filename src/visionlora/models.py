"""Load pretrained models and their image processors from the hub or a local folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visionlora.errors import VisionLoraError


def is_builtin(ref: str) -> bool:
    """Built-in small models with random weights are called ``tiny`` or ``tiny-<variant>``."""
    return (ref == "tiny" or ref.startswith("tiny-")) and not Path(ref).exists()


def load_pretrained(auto_class, ref: str, with_processor: bool = True, **kwargs: Any):
    """``auto_class.from_pretrained(ref)`` (safetensors only, no remote code) and its processor.

    A new head size is allowed (``ignore_mismatched_sizes``): the head is re-initialised
    for the dataset's labels and trained. Loading problems become one-line errors.
    """
    from transformers import AutoImageProcessor

    try:
        model = auto_class.from_pretrained(
            ref, ignore_mismatched_sizes=True, use_safetensors=_prefers_safetensors(ref), trust_remote_code=False, **kwargs
        )
        processor = AutoImageProcessor.from_pretrained(ref, backend="pil") if with_processor else None
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "folder" if Path(ref).exists() else "hub id (offline, or no such model?)"
        raise VisionLoraError(f"{ref}: cannot load model from this {kind}: {first}") from None
    return model, processor


def _prefers_safetensors(ref: str) -> bool | None:
    """Insist on safetensors for local folders that have them; let the hub choose otherwise."""
    path = Path(ref)
    if path.is_dir():
        return True if any(path.glob("*.safetensors")) else None
    return None
