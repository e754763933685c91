"""The ``visionlora check`` command's work: check, optionally find label errors, write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from visionlora.checking.label_errors import FoldSettings, drawer, label_error_findings, predict_folds, train_folds
from visionlora.checking.report import summary_line, terminal_lines, write_html, write_json
from visionlora.checking.scan import CheckResult, run_checks
from visionlora.data.checks import ERROR, WARNING
from visionlora.errors import VisionLoraError
from visionlora.tasks import get_task

__all__ = ["FoldSettings", "check", "default_output", "exit_code"]


def default_output(data: str) -> Path:
    """``runs/check/<DATA's name>``."""
    return Path("runs") / "check" / (Path(data).resolve().name or "data")


def check(data: str, task_name: str, val_data: str | None = None, model: str | None = None,
          image_size: int | None = None, output: str | None = None, progress: bool = True,
          folds: FoldSettings | None = None,
          say: Callable[[str], None] = print) -> tuple[CheckResult, list[str], list[Path]]:
    """(result, the terminal's lines, the files written) of checking ``data`` (and with ``folds``, its label errors)."""
    task = get_task(task_name)
    if image_size is not None and image_size < 8:
        raise VisionLoraError(f"--image-size must be at least 8, not {image_size}")
    result = run_checks(task, data, val_data, image_size, model, progress)
    folder = Path(output) if output else default_output(data)
    draw = None
    if folds is not None:
        records = sum(part["records"] for split, part in result.parts.items() if split in ("train", "val"))
        run_dirs = train_folds(task, data, val_data, model, folds, records, folder / "folds", say)
        found = predict_folds(task, run_dirs)
        result.findings += label_error_findings(task, found)
        result.sources.update(zip(found.names, found.sources))
        draw = drawer(found.run)
    written = [write_json(result, folder / "check.json"), write_html(result, folder / "check.html", draw)]
    return result, [*terminal_lines(result.findings), summary_line(result)], written


def exit_code(result: CheckResult, strict: bool = False) -> int:
    """1 when an error was found (or, ``strict``, a warning), else 0."""
    failing = result.count(ERROR) + (result.count(WARNING) if strict else 0)
    return 1 if failing else 0
