"""LoRA vs full, side by side: train both (one process each) or read two finished runs.

Writes ``comparison.md``, ``comparison.json`` and ``comparison.png`` with the main and
other metrics, file size on disk, trainable parameters, training time, images/s and peak
memory of each run, and their ratio; ``report.html`` shows it with each run's plots, and
each run's own ``report.html`` gains the comparison.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from visionlora.artifacts import atomic_write_bytes, atomic_write_json, find_run, read_json
from visionlora.errors import VisionLoraError
from visionlora.reporting.report import write_comparison_report, write_run_report
from visionlora.reporting.run_summary import RunSummary

MB = 1024 * 1024


def train_both(settings: dict[str, Any], output: Path) -> dict[str, Any]:
    """Train LoRA and full with the same data, seed and schedule, each in its own process
    (so that peak memory is its own), then compare them in ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    config = output / "compare_settings.yaml"
    shared = {k: v for k, v in settings.items() if k not in ("mode", "output", "lr")}
    atomic_write_bytes(config, yaml.safe_dump(shared).encode())
    runs = {}
    for mode in ("lora", "full"):
        run = output / mode
        command = [sys.executable, "-m", "visionlora", "train", "--config", str(config),
                   "--mode", mode, "--output", str(run), "--overwrite"]
        if settings.get("lr") is not None:
            command += ["--lr", str(settings["lr"])]
        completed = subprocess.run(command)
        if completed.returncode != 0:
            raise VisionLoraError(f"{run}: the {mode} training failed (exit {completed.returncode}); "
                                  "see its messages above")
        runs[mode] = run
    return compare_runs(runs["lora"], runs["full"], output)


def compare_runs(run_a: str | Path, run_b: str | Path, output: Path) -> dict[str, Any]:
    """Compare two finished runs (A, B) and write the three comparison files into ``output``."""
    a, b = _summary(run_a), _summary(run_b)
    if a.task != b.task:
        raise VisionLoraError(f"cannot compare a {a.task} run ({run_a}) with a {b.task} run ({run_b})")
    comparison = {
        "task": a.task,
        "main_metric": a.main_metric,
        "runs": {"a": _describe(run_a, a, b), "b": _describe(run_b, b, a)},
        "rows": comparison_rows(a, b),
    }
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output / "comparison.json", comparison)
    atomic_write_bytes(output / "comparison.md", comparison_markdown(comparison).encode())
    atomic_write_bytes(output / "comparison.png", comparison_plot(comparison))
    write_comparison_report(output, comparison)
    for run, summary in ((run_a, a), (run_b, b)):
        write_run_report(find_run(run).results_dir, summary, comparison, output)
    return comparison


def comparison_rows(a: RunSummary, b: RunSummary) -> list[dict[str, Any]]:
    """One row per figure: name, unit, value in A and B, and A/B."""
    main = a.main_metric
    metric_names = [main] + [
        k for k, v in a.metrics.items() if k != main and isinstance(v, (int, float)) and k in b.metrics
    ]
    figures: list[tuple[str, str, Callable[[RunSummary], Any]]] = [
        (f"metric: {name}", "", _metric(name)) for name in metric_names
    ]
    figures += [
        ("weights file", "MB", lambda s: _mb(s.sizes.weights_file_bytes)),
        ("saved model folder", "MB", lambda s: _mb(s.sizes.saved_model_bytes)),
        ("trainable parameters", "", lambda s: s.parameters.trainable),
        ("trainable", "%", lambda s: s.parameters.trainable_percent),
        ("training time", "s", lambda s: s.time.train_seconds),
        ("wall time", "s", lambda s: s.time.wall_seconds),
        ("training images/s", "", lambda s: s.time.train_images_per_second),
        ("peak memory (process RSS)", "MB", lambda s: _mb(s.memory["peak_rss_bytes"])),
    ]
    if "peak_accelerator_bytes" in a.memory and "peak_accelerator_bytes" in b.memory:
        figures.append(("peak accelerator memory", "MB", lambda s: _mb(s.memory["peak_accelerator_bytes"])))
    rows = []
    for name, unit, read in figures:
        value_a, value_b = read(a), read(b)
        ratio = value_a / value_b if isinstance(value_a, (int, float)) and value_b else None
        rows.append({"name": name, "unit": unit, "a": value_a, "b": value_b, "ratio": ratio})
    return rows


def comparison_markdown(comparison: dict[str, Any]) -> str:
    a, b = comparison["runs"]["a"], comparison["runs"]["b"]
    lines = [
        f"# {comparison['task']}: {a['label']} vs {b['label']}",
        "",
        f"- A: `{a['path']}` ({a['mode']}, base {a['base_model']})",
        f"- B: `{b['path']}` ({b['mode']}, base {b['base_model']})",
        f"- main metric: {comparison['main_metric']}",
        "",
        f"| figure | A ({a['label']}) | B ({b['label']}) | A/B |",
        "|---|---:|---:|---:|",
    ]
    for row in comparison["rows"]:
        unit = f" ({row['unit']})" if row["unit"] else ""
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
        lines.append(f"| {row['name']}{unit} | {_fmt(row['a'])} | {_fmt(row['b'])} | {ratio} |")
    return "\n".join(lines) + "\n"


def comparison_plot(comparison: dict[str, Any]) -> bytes:
    """Four bar panels: main metric, weights file size, training time, peak memory."""
    from visionlora.core.plots import figure_png, subplots

    rows = {row["name"]: row for row in comparison["rows"]}
    panels = [f"metric: {comparison['main_metric']}", "weights file", "training time", "peak memory (process RSS)"]
    labels = [comparison["runs"]["a"]["label"], comparison["runs"]["b"]["label"]]
    figure, axes = subplots(1, 4, figsize=(13, 3.4))
    for axis, name in zip(axes, panels):
        row = rows[name]
        values = [row["a"] or 0, row["b"] or 0]
        bars = axis.bar(labels, values, color=["#1f77b4", "#ff7f0e"])
        axis.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8)
        axis.set_title(name + (f" ({row['unit']})" if row["unit"] else ""), fontsize=9)
        if name == "weights file":
            axis.set_yscale("log")
    figure.suptitle(f"{comparison['task']}: {labels[0]} vs {labels[1]}")
    return figure_png(figure, tight=False)


def _summary(run: str | Path) -> RunSummary:
    paths = find_run(run)
    if not paths.summary.is_file():
        raise VisionLoraError(f"{run}: the run did not complete (no training summary)")
    return RunSummary.from_dict(read_json(paths.summary))


def _describe(path: str | Path, summary: RunSummary, other: RunSummary) -> dict[str, Any]:
    """Runs are labelled by mode, or by folder name when both have the same mode."""
    label = summary.mode if summary.mode != other.mode else Path(path).name
    return {"path": str(path), "mode": summary.mode, "base_model": summary.base_model, "label": label}


def _metric(name: str) -> Callable[[RunSummary], Any]:
    """Reads metric ``name`` of a run summary (None where it has none)."""
    return lambda summary: summary.metrics.get(name)


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value / MB, 3)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
