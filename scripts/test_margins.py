r"""Measure the quality thresholds of the test suite over seeds, on this CPU.

Each test that asserts learning quality (an accuracy, an mAP, a pixel error) draws its figure
from a function in its test module; this script runs those functions over several seeds and
prints each figure's range beside the test's threshold, so a threshold can be set with a
measured margin. Run it under each kernel set a user may have, e.g.

    .venv/bin/python scripts/test_margins.py
    ATEN_CPU_CAPABILITY=default .venv/bin/python scripts/test_margins.py
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
        .venv/bin/python scripts/test_margins.py

Run from the repository root (it imports ``tests``). ``--only NAME`` picks checks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import (  # noqa: E402
    test_check,
    test_classification_e2e,
    test_detection,
    test_honest_numbers,
    test_pose,
    test_pretrained,
    test_segmentation,
)
from tests.conftest import NATIVE_BF16  # noqa: E402
from visionlora.examples.synthetic import make_classification_folder  # noqa: E402


class Check(NamedTuple):
    name: str
    threshold: str  # as the test asserts it
    seeds: range
    measure: Callable[[Path, int], dict[str, float]]


def _classification(precision: str):
    def measure(tmp: Path, seed: int) -> dict[str, float]:
        data = make_classification_folder(tmp / "data", per_class_train=16, per_class_val=6, seed=seed)
        return {"accuracy": test_classification_e2e.learnable_task_accuracy(data, tmp, seed, precision)}
    return measure


def _imbalance(tmp: Path, seed: int) -> dict[str, float]:
    data = test_honest_numbers.make_imbalanced_folder(tmp / "data", seed)
    recall = test_honest_numbers.minority_recall(data, tmp, seed)
    return {"weights - plain": recall["class weights"] - recall["plain"],
            "sampler - plain": recall["balanced sampler"] - recall["plain"]}


def _twin(tmp: Path, seed: int) -> dict[str, float]:
    accuracy = test_pretrained.twin_transfer_accuracies(tmp, seed)
    return {"full": accuracy["full"], "lora - full": accuracy["lora"] - accuracy["full"],
            "min(lora, full) - scratch": min(accuracy["lora"], accuracy["full"]) - accuracy["scratch"]}


CHECKS = [
    Check("classification", "accuracy >= 0.9", range(5), _classification("no")),
    Check("classification-bf16", "accuracy >= 0.9", range(5), _classification("bf16")),
    Check("detection", "map50 > 0.3", range(5),
          lambda tmp, seed: {"map50": test_detection.detector_fit_map50(tmp, seed)}),
    Check("detection-bf16", "map50 > 0.3", range(5),
          lambda tmp, seed: {"map50": test_detection.detector_fit_map50(tmp, seed, "bf16")}),
    Check("pose", "error / baseline < 0.4", range(5),
          lambda tmp, seed: {"error / baseline": test_pose.vitpose_fit_error_ratio(tmp, seed)}),
    Check("pose-bf16", "error / baseline < 0.4", range(5),
          lambda tmp, seed: {"error / baseline": test_pose.vitpose_fit_error_ratio(tmp, seed, "bf16")}),
    Check("imbalance", "weights - plain > 0, sampler - plain > 0", range(5), _imbalance),
    Check("twin", "full < 0.95, lora - full >= -0.15, min - scratch >= 0.25", range(7, 12), _twin),
    Check("segmentation", "mean_iou > 0.7", range(5),
          lambda tmp, seed: {"mean_iou": test_segmentation.fit_mean_iou(tmp, seed)}),
    Check("segmentation-twin", "lora - scratch >= 0.05", range(5),
          lambda tmp, seed: {"lora - scratch": (lambda r: r["lora"] - r["scratch"])(
              test_pretrained.segmentation_twin_gain(tmp, seed))}),
    Check("label-errors", "precision >= 0.6, recall >= 0.3", range(5), test_check.label_error_precision_recall),
    Check("pose-twin", "error / baseline < 0.8", range(5, 10),
          lambda tmp, seed: {"error / baseline": test_pretrained.pose_twin_error_ratio(tmp, seed)}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=[c.name for c in CHECKS], help="run only these checks")
    parser.add_argument("--seeds", type=int, help="how many seeds (default: each check's five)")
    args = parser.parse_args()
    kernels = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
               if k in os.environ}
    print(f"kernels: {kernels or 'as detected'}; native bf16: {NATIVE_BF16}")
    print(f"{'check':<20} {'figure':<26} {'min':>7} {'max':>7}  {'seeds':<8} {'seconds':>7}  threshold")
    for check in CHECKS:
        if args.only and check.name not in args.only:
            continue
        seeds = check.seeds[: args.seeds] if args.seeds else check.seeds
        figures: dict[str, list[float]] = {}
        start = time.perf_counter()
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
                measured = check.measure(Path(tmp), seed)
                for key, value in measured.items():
                    figures.setdefault(key, []).append(value)
        seconds = (time.perf_counter() - start) / len(seeds)
        for key, values in figures.items():
            print(f"{check.name:<20} {key:<26} {min(values):7.3f} {max(values):7.3f}  "
                  f"{seeds.start}-{seeds.stop - 1:<6} {seconds:7.1f}  {check.threshold}", flush=True)


if __name__ == "__main__":
    main()
