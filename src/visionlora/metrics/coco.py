"""pycocotools' COCOeval, run quietly on in-memory ground truth and results."""

from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np


def run_cocoeval(ground_truth: dict, results: list[dict], iou_type: str,
                 keypoint_sigmas: Sequence[float] | None = None) -> Any:
    """Evaluate, accumulate and summarise ``results`` against ``ground_truth`` (a COCO dataset dict).

    Returns the COCOeval object (``stats``, ``eval["precision"]``); its printout is swallowed.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = ground_truth
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), iouType=iou_type)
        if keypoint_sigmas is not None:
            evaluation.params.kpt_oks_sigmas = np.asarray(keypoint_sigmas, dtype=np.float64)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def defined(value: float) -> float | None:
    """COCO marks undefined figures (e.g. a class without ground truth) as -1: None here."""
    return None if value < 0 else value
