"""``visionlora check --label-errors``: out-of-sample predictions for every labelled image from k quick
LoRA runs on k folds (trained by ``train-many``, packed over one base where the task packs), each
predicting the fold it never saw; the task scores each record's labels against its prediction
(``TaskReport.label_issues``: cleanlab for classes and boxes, distances for keypoints, IoU for masks)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from visionlora.artifacts import read_json
from visionlora.checking.report import LABEL_ERROR
from visionlora.data.checks import WARNING, Finding, fit_side
from visionlora.data.images import UnreadableImage, load_rgb
from visionlora.data.records import image_source
from visionlora.deploy.predictor import LoadedRun, load_run
from visionlora.errors import VisionLoraError
from visionlora.tasks.base import Task
from visionlora.training.many import plan_jobs, train_many

DEFAULT_FOLDS = 5
MIN_PER_FOLD = 4  # images a held-out fold holds at least
FOLDS_FOLDER = "folds"

Say = Callable[[str], None]


@dataclass
class FoldSettings:
    """How the folds train: how many (None: DEFAULT_FOLDS, fewer for tiny sets), epochs, seed, and any other
    training settings they share (a ``--config`` file's)."""

    folds: int | None = None
    epochs: int = 5
    seed: int = 42
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutOfSample:
    """Every labelled record with its image's name and source, and its prediction by the fold run that never
    saw it; ``run`` is one of those runs (to draw labels with)."""

    records: list[Any]
    names: list[str]
    sources: list[Any]
    predictions: list[dict[str, Any]]
    run: LoadedRun


def fold_count(images: int, requested: int | None) -> int:
    """The folds to train: the requested number, else DEFAULT_FOLDS, fewer where a fold would hold under
    MIN_PER_FOLD images; at least 2."""
    if requested is not None:
        if requested < 2:
            raise VisionLoraError(f"--folds must be at least 2, not {requested}")
        if requested > images:
            raise VisionLoraError(f"--folds {requested}: more folds than the {images} labelled images")
        return requested
    count = min(DEFAULT_FOLDS, images // MIN_PER_FOLD)
    if count < 2:
        raise VisionLoraError(f"--label-errors needs at least {2 * MIN_PER_FOLD} labelled images, found {images}")
    return count


def train_folds(task: Task, data: str, val_data: str | None, model: str | None, settings: FoldSettings,
                records: int, output: Path, say: Say) -> list[str]:
    """Train the fold runs with train-many into ``output``; their run folders, fold 1 first."""
    folds = fold_count(records, settings.folds)
    specs = [{"name": f"fold{index}", "data": data, "fold": f"{index}/{folds}",
              **({"val_data": val_data} if val_data else {})} for index in range(1, folds + 1)]
    flags = {"task": task.name, "epochs": settings.epochs, "seed": settings.seed, "save_every": 0,
             "progress": False, "overwrite": True, **({"model": model} if model else {})}
    jobs, failed = plan_jobs(specs, settings.settings, flags, output)
    say(f"label errors: training {folds} fold runs ({settings.epochs} epochs each) into {output}")
    outcomes = failed + train_many(jobs, output, say)
    broken = [outcome for outcome in outcomes if outcome.status == "failed"]
    if broken:
        raise VisionLoraError(f"fold run {broken[0].name} failed: {broken[0].error}")
    return [outcome.run_dir for outcome in outcomes]


def predict_folds(task: Task, run_dirs: list[str]) -> OutOfSample:
    """Each fold's held-out records predicted by its own run (unreadable images left out)."""
    records: list[Any] = []
    names: list[str] = []
    sources: list[Any] = []
    predictions: list[dict[str, Any]] = []
    run = None
    for run_dir in run_dirs:
        run = load_run(run_dir, "cpu")
        part = task.data.read_validation(read_json(run.paths.summary))
        kept, images = [], []
        for record in part.records:
            try:
                images.append(load_rgb(image_source(record)))
                kept.append(record)
            except UnreadableImage:
                continue
        predictions += predict_as_labelled(task, run, kept, images)
        records += kept
        sources += [image_source(record) for record in kept]
        names += [str(source) if isinstance(source, (str, Path)) else f"{part.where}[{i}]"
                  for i, source in enumerate(sources[len(names):])]
    if run is None:
        raise VisionLoraError("no fold runs to predict with")
    return OutOfSample(records, names, sources, predictions, run)


def predict_as_labelled(task: Task, run: LoadedRun, records: list[Any], images: list[Any]) -> list[dict[str, Any]]:
    """Predictions of ``images`` about the instances their records label (top-down: in the labelled boxes, one
    image at a time), else all at once."""
    options = task.report.out_of_sample_options(run.info)
    asked = [task.report.ground_truth(record, image, run.info)[1] for record, image in zip(records, images)]
    if not any(asked):
        return run.predict(images, **options)
    return [run.predict([image], **options, **own)[0] for image, own in zip(images, asked)]


def label_error_findings(task: Task, found: OutOfSample) -> list[Finding]:
    """The records the task flags, likeliest error first, each with its given and predicted labels."""
    issues = task.report.label_issues(found.records, found.predictions, found.run.info)
    flagged = sorted((issue.score, index) for index, issue in enumerate(issues) if issue.flagged)
    findings = []
    for score, index in flagged:
        image = load_rgb(found.sources[index])
        given, _ = task.report.ground_truth(found.records[index], image, found.run.info)
        findings.append(Finding(WARNING, LABEL_ERROR, found.names[index], f"likely label error (quality "
                                f"{score:.3f}): {issues[index].message}", score=score, given=given,
                                predicted=found.predictions[index]))
    return findings


def drawer(run: LoadedRun, side: int = 160) -> Callable[[Any, dict[str, Any]], bytes | None]:
    """(image source, prediction-shaped labels) -> a PNG of the labels drawn by the run's task, at most ``side``
    pixels (a small image enlarged)."""

    def draw(source: Any, labels: dict[str, Any]) -> bytes | None:
        try:
            image = fit_side(run.draw(load_rgb(source), labels), side)
        except UnreadableImage:
            return None
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    return draw
