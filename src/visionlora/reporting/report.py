"""``report.html``: one self-contained page per run (and per comparison) that opens from a file
in any browser: the summary, every plot and the prediction grid embedded, no scripts, no
network."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any, Iterable

from visionlora.artifacts import atomic_write_bytes, find_run
from visionlora.reporting.run_summary import RunSummary

# Plots in the order a reader wants them; any other PNG in the results folder follows.
PLOT_ORDER = ("metrics.png", "loss.png", "confusion_matrix.png", "precision_recall.png", "keypoint_errors.png",
              "pck_curve.png", "predictions.png")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
td, th { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f4f4f4; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } figure img { max-width: min(100%, 900px); border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; } .headline { font-size: 1.3rem; font-weight: bold; }
.cards { display: flex; flex-wrap: wrap; gap: 0.6rem; } .card { border: 1px solid #ddd; padding: 0.4rem;
  width: 250px; font-size: 0.8rem; } .card img { border: 1px solid #eee; margin-right: 2px; vertical-align: top; }
.error { color: #b00020; font-weight: bold; } .warning { color: #a05a00; font-weight: bold; } .info { color: #555; }
"""


def write_run_report(results_dir: Path, summary: RunSummary, comparison: dict[str, Any] | None = None,
                     comparison_dir: Path | None = None) -> Path:
    """Write ``results_dir/report.html`` for a finished run (with a comparison it took part in)."""
    sections = [_headline(summary), _table("Validation metrics", _scalars(summary.metrics))]
    if summary.test_metrics:
        sections.append(_table("Held-out test metrics", _scalars(summary.test_metrics)))
    per_class = results_dir / "per_class.csv"
    if per_class.exists():
        sections.append(_csv_table("Per class (validation, best epoch)", per_class))
    sections.append(_table("Run", _run_facts(summary)))
    sections.append(_table("Data", _data_facts(summary)))
    if comparison is not None:
        sections.append(_comparison_section(comparison, comparison_dir))
    sections.append("<h2>Plots</h2>" + "".join(_figure(path) for path in _plots(results_dir)))
    title = f"visionlora {summary.task} {_method(summary)} run: {Path(summary.run_dir).name}"
    return write_page(results_dir / "report.html", title, sections)


def write_comparison_report(output: Path, comparison: dict[str, Any]) -> Path:
    """Write ``output/report.html``: the comparison and each run's plots."""
    sections = [_comparison_section(comparison, output)]
    for key in ("a", "b"):
        run = comparison["runs"][key]
        results = find_run(run["path"]).results_dir
        sections.append(f"<h2>{key.upper()}: {html.escape(run['label'])}</h2>"
                        + "".join(_figure(path) for path in _plots(results) if path.name != "loss.png"))
    return write_page(output / "report.html", f"visionlora comparison: {comparison['task']}", sections)


# -- sections ----------------------------------------------------------------------------------
def _headline(summary: RunSummary) -> str:
    value = summary.headline.value
    shown = f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))
    return (f"<p class='headline'>{html.escape(summary.main_metric)} ({html.escape(summary.headline.split)}): "
            f"{shown}</p><p>best epoch {summary.best_epoch} of {summary.training.epochs_run}</p>")


def _run_facts(summary: RunSummary) -> list[tuple[str, Any]]:
    settings, params = summary.training.settings, summary.parameters
    facts = [("task", summary.task), ("mode", _method(summary)), ("base model", summary.base_model),
             ("base revision", summary.base_revision), ("epochs", settings.get("epochs")),
             ("batch size", settings.get("batch_size")), ("learning rate", settings.get("lr")),
             ("precision", summary.mixed_precision),
             ("trainable parameters", f"{params.trainable:,} of {params.total:,} ({params.trainable_percent}%)"),
             ("saved model", f"{summary.sizes.saved_model_bytes / 1e6:.2f} MB"),
             ("wall time", f"{summary.time.wall_seconds:.1f} s"),
             ("train images / s", summary.time.train_images_per_second)]
    lora = summary.lora
    if lora:
        facts += [("adapter", f"r {lora.requested['r']}, alpha {lora.requested['alpha']}"),
                  ("adapted modules", ", ".join(lora.resolved["target_modules"]))]
    return facts


def _data_facts(summary: RunSummary) -> list[tuple[str, Any]]:
    data = summary.data
    facts = [(f"{split} images", count) for split, count in data.counts.items() if not isinstance(count, dict)]
    facts += [("skipped files", data.skipped_count)]
    facts += [("note", note) for note in data.notes]
    return facts


def _comparison_section(comparison: dict[str, Any], folder: Path | None) -> str:
    head = "<tr><th>figure</th><th>A</th><th>B</th><th>A / B</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(_row_name(row))}</td>"
        + "".join(f"<td class='number'>{html.escape(_fmt(row.get(k)))}</td>" for k in ("a", "b", "ratio")) + "</tr>"
        for row in comparison["rows"])
    runs = "".join(f"<li>{k.upper()}: {html.escape(v['label'])} ({html.escape(v['path'])})</li>"
                   for k, v in comparison["runs"].items())
    plot = _figure(folder / "comparison.png") if folder is not None and (folder / "comparison.png").exists() else ""
    return f"<h2>Comparison</h2><ul>{runs}</ul><table>{head}{body}</table>{plot}"


def _row_name(row: dict[str, Any]) -> str:
    return f"{row['name']} ({row['unit']})" if row.get("unit") else row["name"]


def _table(title: str, facts: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in facts)
    return f"<h2>{html.escape(title)}</h2><table>{rows}</table>"


def _csv_table(title: str, path: Path) -> str:
    rows = list(csv.reader(io.StringIO(path.read_text())))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td class='number'>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows[1:])
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


def _figure(path: Path) -> str:
    """The PNG at ``path`` embedded as a data URI."""
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(path.stem)}'>"
            f"<figcaption>{html.escape(path.name)}</figcaption></figure>")


def _plots(results_dir: Path) -> list[Path]:
    found = {p.name: p for p in results_dir.glob("*.png")}
    return [found.pop(name) for name in PLOT_ORDER if name in found] + [found[n] for n in sorted(found)]


def _scalars(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in metrics.items() if not isinstance(v, (dict, list))]


def _method(summary: RunSummary) -> str:
    return f"{summary.mode} ({summary.method})" if summary.lora else summary.mode


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_page(path: Path, title: str, sections: list[str]) -> Path:
    """A self-contained page of ``sections`` (HTML) under ``title``, in the reports' style, written atomically."""
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n")
    atomic_write_bytes(path, page.encode())
    return path
