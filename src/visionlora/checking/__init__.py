"""``visionlora check``: a dataset's problems found without a model (:mod:`~visionlora.checking.scan`), and
with ``--label-errors`` its likely label errors from out-of-sample predictions of k LoRA runs on k folds
(:mod:`~visionlora.checking.label_errors`); written as ``check.json`` and ``check.html``
(:mod:`~visionlora.checking.report`)."""

from __future__ import annotations

from visionlora.checking.scan import CheckResult, run_checks

__all__ = ["CheckResult", "run_checks"]
