"""Read a dataset's parts through the task's readers and run every check on them: the shared ones
(:mod:`visionlora.data.checks`) and the task's own (``TaskData.check_record``)."""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from visionlora.data import checks
from visionlora.data.checks import ERROR, INFO, Finding, ImageFacts
from visionlora.data.records import Part, image_source
from visionlora.data.splits import locate_parts
from visionlora.errors import VisionLoraError
from visionlora.modeling.builtin import PRETRAINED_SUFFIX, is_builtin
from visionlora.tasks.base import Task

DEFAULT_INPUT = 224  # the input size assumed when the model's own cannot be read offline


@dataclass
class CheckedImage:
    """One image of a part: its name in messages, what opens it, and the records that label it."""

    name: str
    source: Any
    split: str
    records: list[Any] = field(default_factory=list)


@dataclass
class CheckResult:
    """Everything ``visionlora check`` found in one dataset."""

    data: str
    task: str
    input_size: int
    parts: dict[str, dict[str, Any]]
    findings: list[Finding]
    class_counts: dict[str, dict[str, int]]
    sizes: dict[str, Any]
    sources: dict[str, Any]  # image name -> what opens it (for thumbnails)
    images: int = 0

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)


def read_parts(task: Task, data: str, val_data: str | None = None) -> tuple[list[tuple[str, Part]], list[Finding]]:
    """(split, part) of each part of ``data`` the task's readers read, and a finding for each that they
    cannot (its annotations are broken); a missing ``data`` is an error."""
    layout = locate_parts(data, val_data)
    if not layout.train.exists():
        raise VisionLoraError(f"{data}: no such folder or file")
    parts: list[tuple[str, Part]] = []
    findings: list[Finding] = []
    for split, path in (("train", layout.train), ("val", layout.val), ("test", layout.test)):
        if path is None:
            continue
        try:
            part = task.data.read_part(path)
        except VisionLoraError as err:
            findings.append(Finding(ERROR, "annotations", str(path), str(err), split))
            continue
        parts.append((split, part))
        if split == "train" and layout.val is None and part.own_val is not None:
            parts.append(("val", part.own_val))
    return parts, findings


def part_images(split: str, part: Part) -> list[CheckedImage]:
    """The images a part's records name, each once, with its records."""
    images: dict[str, CheckedImage] = {}
    for index, record in enumerate(part.records):
        source = image_source(record)
        name = str(source) if isinstance(source, (str, Path)) else f"{part.where}[{index}]"
        images.setdefault(name, CheckedImage(name, source, split)).records.append(record)
    return list(images.values())


def inspect_all(images: Sequence[CheckedImage], progress: bool = True, workers: int | None = None) -> list[ImageFacts]:
    """Each image inspected once (threads: decoding and hashing release the GIL), with a progress bar."""
    from tqdm.auto import tqdm

    workers = workers or min(8, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(workers) as pool:
        jobs = pool.map(lambda image: checks.inspect_image(image.source, image.name, image.split), images)
        return list(tqdm(jobs, total=len(images), desc="checking images", unit="image", disable=not progress,
                         leave=False))


def run_checks(task: Task, data: str, val_data: str | None = None, input_size: int | None = None,
               model: str | None = None, progress: bool = True) -> CheckResult:
    """Read ``data`` as ``task`` reads it for training and check it all."""
    parts, findings = read_parts(task, data, val_data)
    size = input_size or model_input_size(task, model or task.preset.model)
    images = [image for split, part in parts for image in part_images(split, part)]
    facts = inspect_all(images, progress)
    findings += checks.unreadable(facts) + checks.rotated(facts) + checks.duplicates(facts)
    findings += checks.sizes(facts, size, task.dynamic_image_size)
    findings += record_findings(task, images, facts, {split: list(part.labels) for split, part in parts})
    findings += reading_findings(parts)
    labels = list(parts[0][1].labels) if parts else []
    counts = {split: Counter(name for record in part.records for name in task.data.record_classes(record))
              for split, part in parts}
    findings += checks.class_balance(counts, labels)
    described = {split: {"where": part.where, "format": part.format, "records": len(part.records),
                         "labels": list(part.labels)} for split, part in parts}
    order = {severity: i for i, severity in enumerate(checks.SEVERITIES)}
    findings.sort(key=lambda f: order[f.severity])
    return CheckResult(data, task.name, size, described, findings,
                       {split: dict(sorted(counter.items())) for split, counter in counts.items()},
                       checks.size_summary(facts), {image.name: image.source for image in images}, len(images))


def record_findings(task: Task, images: Sequence[CheckedImage], facts: Sequence[ImageFacts],
                    labels: dict[str, list[str]]) -> list[Finding]:
    """The task's own checks of each record whose image reads."""
    found = []
    for image, fact in zip(images, facts):
        if fact.error:
            continue
        for record in image.records:
            for message in task.data.check_record(record, fact.shown_size, labels[image.split]):
                found.append(Finding(ERROR, "label", image.name, message, image.split))
    return found


def reading_findings(parts: Sequence[tuple[str, Part]]) -> list[Finding]:
    """What the readers left out or noted, per part: dropped annotations are errors, skipped files and
    records warnings, notes information."""
    found = []
    for split, part in parts:
        found += checks.reading_findings(part.dropped, ERROR, "annotation-dropped", split)
        found += checks.reading_findings(part.skipped, checks.WARNING, "skipped", split)
        found += [Finding(INFO, "note", "", note, split) for note in part.extra.get("notes", [])]
    return found


def model_input_size(task: Task, model: str) -> int:
    """The input size of ``model``: a built-in's own, a local or cached checkpoint's processor's, else 224."""
    if is_builtin(model):
        name = model.removesuffix(PRETRAINED_SUFFIX)
        return next((m.default_size for m in task.builtin_models if m.name == name), DEFAULT_INPUT)
    config = Path(model) / "preprocessor_config.json"
    if not config.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "preprocessor_config.json")
        except Exception:  # not a hub id: the default size stands
            cached = None
        config = Path(cached) if isinstance(cached, str) else config
    if not config.is_file():
        return DEFAULT_INPUT
    return processor_side(json.loads(config.read_text()))


def processor_side(settings: dict[str, Any]) -> int:
    """The shorter side a processor configuration resizes (or crops) to."""
    size = settings.get("crop_size") if settings.get("do_center_crop") else settings.get("size")
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        values = [int(size[k]) for k in ("height", "width", "shortest_edge") if size.get(k)]
        if values:
            return min(values)
    return DEFAULT_INPUT
