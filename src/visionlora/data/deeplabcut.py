"""DeepLabCut projects: ``config.yaml`` and ``labeled-data/<video>/CollectedData_<scorer>.csv``."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from visionlora.data.paths import resolve_image
from visionlora.data.records import DataFormat, Part, PoseInstance, PoseRecord, mark_unlabelled
from visionlora.errors import VisionLoraError


def is_deeplabcut_project(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file() and (path / "labeled-data").is_dir()


def read_deeplabcut(root: Path) -> Part:
    """A single-animal project's labelled frames; it asks to hold out 1 - TrainingFraction."""
    config = _config(root / "config.yaml")
    names = [str(n) for n in config["bodyparts"]]
    skeleton = _skeleton(root / "config.yaml", config.get("skeleton") or [], names)
    fraction = _training_fraction(root / "config.yaml", config.get("TrainingFraction"))
    tables = sorted((root / "labeled-data").glob("*/CollectedData_*.csv"))
    if not tables:
        raise VisionLoraError(f"{root}/labeled-data: no CollectedData_*.csv files (export the labels as CSV)")
    records, skipped = [], []
    for table in tables:
        found, dropped = _read_table(root, table, names)
        records += found
        skipped += dropped
    holdout = round(1.0 - fraction, 6) if fraction and 0 < fraction < 1 else None
    return Part(records, names, "deeplabcut", str(root), skipped=skipped, extra={"skeleton": skeleton}, holdout=holdout)


def _config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise VisionLoraError(f"{path}: not valid YAML") from None
    if not isinstance(config, dict) or not isinstance(config.get("bodyparts"), list) or not config["bodyparts"]:
        raise VisionLoraError(f"{path}: no 'bodyparts' list")
    if len(set(map(str, config["bodyparts"]))) != len(config["bodyparts"]):
        raise VisionLoraError(f"{path}: 'bodyparts' lists a name twice")
    if config.get("multianimalproject"):
        raise VisionLoraError(f"{path}: multi-animal DeepLabCut projects are not supported; "
                              "use a single-animal project")
    return config


def _training_fraction(path: Path, value: Any) -> float | None:
    """The first TrainingFraction, which must be a number between 0 and 1 (None when absent)."""
    if value in (None, []):
        return None
    first = value[0] if isinstance(value, list) else value
    if isinstance(first, bool) or not isinstance(first, (int, float)) or not 0 < first <= 1:
        raise VisionLoraError(f"{path}: TrainingFraction must be a list of numbers between 0 and 1, got {value!r}")
    return float(first)


def _skeleton(path: Path, edges: list, names: list[str]) -> list[list[int]]:
    pairs = []
    for edge in edges:
        if not (isinstance(edge, list) and len(edge) == 2 and all(e in names for e in edge)):
            raise VisionLoraError(f"{path}: skeleton edge {edge!r} names a body part not in 'bodyparts'")
        pairs.append([names.index(edge[0]), names.index(edge[1])])
    return pairs


def _read_table(root: Path, table: Path, names: list[str]) -> tuple[list[PoseRecord], list[dict[str, str]]]:
    with table.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 3 or rows[0][:1] != ["scorer"]:
        raise VisionLoraError(f"{table}: expected DeepLabCut's header rows (scorer / bodyparts / coords)")
    if rows[1][:1] == ["individuals"]:
        raise VisionLoraError(f"{table}: multi-animal labels are not supported")
    bodyparts_row, coords_row = rows[1], rows[2]
    if "x" not in coords_row:
        raise VisionLoraError(f"{table}: the coords header row has no x/y columns")
    first = coords_row.index("x")
    columns = _columns(table, bodyparts_row[first:], coords_row[first:], names, first)
    records, skipped = [], []
    for number, row in enumerate(rows[3:], start=4):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{table}:{number}"
        relative = "/".join(cell.strip() for cell in row[:first] if cell.strip())
        image = resolve_image(root, relative, where, search=("", f"labeled-data/{table.parent.name}"))
        keypoints = np.zeros((len(names), 3))
        for index, (x_col, y_col) in enumerate(columns):
            keypoints[index] = [_number(row, x_col, where), _number(row, y_col, where), 1.0]
        keypoints = mark_unlabelled(keypoints)
        if not keypoints[:, 2].any():
            skipped.append({"annotation": where, "reason": "no labelled keypoint"})
            continue
        records.append(PoseRecord(str(image), [PoseInstance(keypoints)], source=where, whole_image=True))
    return records, skipped


def _columns(table: Path, bodyparts: list[str], coords: list[str], names: list[str],
             offset: int) -> list[tuple[int, int]]:
    """Column numbers of (x, y) for each configured body part, in config order."""
    found: dict[str, dict[str, int]] = {}
    for position, (part, coord) in enumerate(zip(bodyparts, coords)):
        found.setdefault(part, {})[coord] = position + offset
    if set(found) != set(names):
        raise VisionLoraError(
            f"{table}: body parts {', '.join(found)} differ from config.yaml's {', '.join(names)} "
            f"({len(found)} vs {len(names)} keypoints)"
        )
    return [(found[n]["x"], found[n]["y"]) for n in names]


def _number(row: list[str], column: int, where: str) -> float:
    text = row[column].strip() if column < len(row) else ""
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise VisionLoraError(f"{where}: {text!r} is not a number") from None


FORMAT = DataFormat(
    name="deeplabcut",
    expected="a DeepLabCut project with config.yaml and labeled-data/",
    finds=is_deeplabcut_project,
    read=read_deeplabcut,
)
