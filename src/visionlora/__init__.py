"""visionlora: fine-tune pretrained vision transformers with LoRA or fully."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

from visionlora.errors import VisionLoraError  # noqa: E402


def load(run_dir, device=None, precision="fp32"):
    """Load a finished run (base model + adapter, or full model) for prediction.

    Returns a :class:`visionlora.deploy.predictor.LoadedRun` with ``predict`` and ``evaluate``.
    ``precision``: fp32 (default), bf16 or auto (bf16 where the device runs it natively, checked
    against fp32 on a few of the run's images; the choice is the run's ``precision``).
    """
    from visionlora.deploy.predictor import load_run

    return load_run(run_dir, device=device, precision=precision)


__all__ = ["VisionLoraError", "load", "__version__"]
