"""The run's results: history.csv, the plots, then training_summary.json (written last)."""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from visionlora import __version__
from visionlora.artifacts import RunPaths, atomic_write_bytes, atomic_write_json, folder_bytes, rows_csv
from visionlora.config import TrainConfig
from visionlora.modeling.adapters import AdapterSetup
from visionlora.reporting.model_card import model_card
from visionlora.reporting.plots import save_training_plots
from visionlora.reporting.report import write_run_report
from visionlora.reporting.run_summary import (
    AdapterSummary,
    DataSummary,
    Headline,
    ParameterCounts,
    RunSummary,
    Sizes,
    Timing,
    TrainingSummary,
)
from visionlora.runtime import peak_memory
from visionlora.tasks.base import Datasets, ModelInfo, Task
from visionlora.training.checkpoint import Progress


@dataclass
class RunFacts:
    """What a run learns besides its loop's progress: settings, precision, data, model, final metrics."""

    cfg: TrainConfig
    precision: tuple[str, str]  # (Accelerate's mixed precision, why it was chosen)
    started: float
    data: Datasets | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    adapter: AdapterSetup | None = None
    base_bytes: int = 0
    final_metrics: dict[str, Any] = field(default_factory=dict)  # the best weights' on validation
    metrics_precision: str = "fp32"  # the precision of the pass that gave ``final_metrics``
    test_metrics: dict[str, Any] | None = None  # the best weights' on the held-out test part
    init_from: dict[str, Any] | None = None  # the run this one started from (--init-from)
    initial_metrics: dict[str, Any] | None = None  # the starting weights', before training
    base_revision: str | None = None
    data_loading: dict[str, Any] | None = None  # the loader the run used (workers, pinning, why)
    phases: dict[str, float] = field(default_factory=dict)  # seconds of each part of the run so far
    _lapped: float | None = None

    def lap(self, phase: str) -> None:
        """Add the seconds since the last lap (or the run's start) to ``phase``: the summary's
        ``time.phases``, where a short run's time outside its training steps goes."""
        now = time.perf_counter()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + now - (self._lapped or self.started), 3)
        self._lapped = now


def write_results(paths: RunPaths, task: Task, info: ModelInfo, facts: RunFacts, progress: Progress,
                  early_stopped: bool) -> dict[str, Any]:
    """history.csv, loss.png and metrics.png (unless ``--no-figures``), the model card, report.html, then
    the summary, which marks the run complete."""
    history = progress.history
    paths.results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(paths.history, rows_csv(history).encode())
    if facts.cfg.figures:
        save_training_plots(history, paths.loss_plot, paths.metrics_plot, task.main_metric, task.unbounded_metrics,
                            facts.test_metrics)
        facts.lap("training plots")
    summary = build_summary(paths, task, facts, progress, early_stopped)
    atomic_write_bytes(paths.model_dir / "README.md", model_card(task, info, summary).encode())
    write_run_report(paths.results_dir, summary)
    facts.lap("model card and report")
    summary.time = timing(facts, progress)
    written = summary.to_dict()
    atomic_write_json(paths.summary, written)
    return written


def build_summary(paths: RunPaths, task: Task, facts: RunFacts, progress: Progress,
                  early_stopped: bool) -> RunSummary:
    """The summary of a finished run (see the README's 'What a run writes')."""
    cfg, data = facts.cfg, facts.data
    if data is None or cfg.model is None:
        raise ValueError("a run's summary needs its data and its model, known once training started")
    weights = next(iter(sorted(paths.model_dir.glob("*.safetensors"))), None)
    return RunSummary(
        task=cfg.task,
        mode=cfg.mode,
        base_model=cfg.model,
        base_revision=facts.base_revision,
        init_from=facts.init_from,
        initial_metrics=facts.initial_metrics,
        run_dir=str(paths.root),
        data=DataSummary(dict(data.description), data.counts, len(data.skipped), data.skipped,
                         dataclasses.asdict(data.cache) if data.cache else None),
        training=TrainingSummary(cfg.to_dict(), len(progress.history), early_stopped, progress.global_step,
                                 facts.data_loading),
        lora=None if facts.adapter is None else AdapterSummary(facts.adapter.requested, facts.adapter.resolved),
        parameters=ParameterCounts(**facts.parameters),
        sizes=Sizes(saved_model_bytes=folder_bytes(paths.model_dir),
                    weights_file_bytes=weights.stat().st_size if weights else None,
                    base_model_bytes=facts.base_bytes),
        mixed_precision=facts.precision[0].replace("no", "fp32"),
        mixed_precision_reason=facts.precision[1],
        main_metric=task.main_metric,
        best_epoch=progress.best_epoch,
        metrics=facts.final_metrics or progress.best_metrics,
        metrics_precision=facts.metrics_precision,
        test_metrics=facts.test_metrics,
        headline=_headline(task.main_metric, facts),
        metrics_in_training_precision=progress.best_metrics,
        time=timing(facts, progress),
        memory=peak_memory(),
        versions=versions(),
    )


def timing(facts: RunFacts, progress: Progress) -> Timing:
    """The run's times so far, its ``epochs`` phase split into the training steps and the rest
    (the evaluation after each epoch, the checkpoints)."""
    phases: dict[str, float] = {}
    for phase, seconds in facts.phases.items():
        if phase == "epochs":
            steps = round(min(progress.train_seconds, seconds), 3)
            phases["training steps"] = steps
            phases["evaluation and checkpoints between epochs"] = round(seconds - steps, 3)
        else:
            phases[phase] = seconds
    return Timing(wall_seconds=round(time.perf_counter() - facts.started, 3),
                  train_seconds=round(progress.train_seconds, 3),
                  train_images_per_second=round(progress.images_seen / max(progress.train_seconds, 1e-9), 2),
                  started_at=round(time.time() - (time.perf_counter() - facts.started), 3), phases=phases)


def _headline(main_metric: str, facts: RunFacts) -> Headline:
    """The number to quote: the test part's main metric when there is one, else validation's."""
    if facts.test_metrics is not None:
        return Headline("test", main_metric, facts.test_metrics[main_metric], facts.final_metrics.get(main_metric))
    return Headline("validation", main_metric, facts.final_metrics.get(main_metric))


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    return {
        "visionlora": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }
