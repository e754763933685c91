"""``check.json``, ``check.html`` (a thumbnail of each finding, embedded) and the terminal's lines."""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

from visionlora.artifacts import atomic_write_json
from visionlora.checking.scan import CheckResult
from visionlora.data.checks import SEVERITIES, Finding, thumbnail_png
from visionlora.reporting.report import write_page

CARDS_PER_KIND = 60  # findings of one kind shown with thumbnails; check.json holds them all
LINES_PER_KIND = 20  # terminal lines of one kind; the rest are counted
THUMBS_PER_CARD = 4
LABEL_ERROR = "label-error"  # the kind of the findings --label-errors adds
# (image source, prediction-shaped labels) -> PNG of the labels drawn on the image, for label errors
Drawer = Callable[[Any, dict[str, Any]], bytes | None]


def terminal_lines(findings: Iterable[Finding]) -> list[str]:
    """One line per finding naming its file, at most LINES_PER_KIND of a kind (then how many more)."""
    lines: list[str] = []
    shown: dict[str, int] = defaultdict(int)
    hidden: dict[str, int] = defaultdict(int)
    for finding in findings:
        if shown[finding.kind] < LINES_PER_KIND:
            shown[finding.kind] += 1
            lines.append(finding.line())
        else:
            hidden[finding.kind] += 1
    lines += [f"... and {count} more {kind} findings (see check.json)" for kind, count in hidden.items()]
    return lines


def summary_line(result: CheckResult) -> str:
    counts = ", ".join(f"{result.count(s)} {s}{'s' if result.count(s) != 1 else ''}" for s in SEVERITIES)
    return f"checked {result.images} images of {result.data} ({result.task}): {counts}"


def write_json(result: CheckResult, path: Path) -> Path:
    atomic_write_json(path, {
        "data": result.data, "task": result.task, "images": result.images, "input_size": result.input_size,
        "counts": {severity: result.count(severity) for severity in SEVERITIES},
        "parts": result.parts, "class_counts": result.class_counts, "sizes": result.sizes,
        "findings": [finding.to_dict() for finding in result.findings],
    })
    return path


def write_html(result: CheckResult, path: Path, draw: Drawer | None = None) -> Path:
    """The page: counts, parts, classes, sizes, then each kind of finding with thumbnails (label errors
    with the given and the predicted labels drawn side by side)."""
    thumbs = Thumbnails(result.sources)
    sections = [f"<p class='headline'>{html.escape(summary_line(result))}</p>"]
    by_kind: dict[str, list[Finding]] = defaultdict(list)
    for finding in result.findings:
        by_kind[finding.kind].append(finding)
    rank = {severity: i for i, severity in enumerate(SEVERITIES)}
    for kind in sorted(by_kind, key=lambda k: (rank[by_kind[k][0].severity], k != LABEL_ERROR)):
        if kind == LABEL_ERROR:
            sections.append(_label_errors(by_kind[kind], result.sources, draw, thumbs))
        else:
            sections.append(_kind_section(kind, by_kind[kind], thumbs))
    sections += [_parts_table(result), _class_table(result), _sizes_table(result)]
    return write_page(path, f"visionlora check: {result.data}", sections)


class Thumbnails:
    """Base64 PNG thumbnails of the checked images, each made once."""

    def __init__(self, sources: dict[str, Any]):
        self.sources = sources
        self.made: dict[str, str | None] = {}

    def img(self, name: str) -> str:
        if name not in self.made:
            data = thumbnail_png(self.sources.get(name, name))
            self.made[name] = base64.b64encode(data).decode() if data else None
        encoded = self.made[name]
        if encoded is None:
            return "<span class='error'>[unreadable]</span>"
        return f"<img src='data:image/png;base64,{encoded}' alt='{html.escape(Path(name).name)}'>"


def _kind_section(kind: str, findings: list[Finding], thumbs: Thumbnails) -> str:
    cards = []
    for finding in findings[:CARDS_PER_KIND]:
        files = [name for name in [finding.file, *finding.others] if name][:THUMBS_PER_CARD]
        images = "".join(thumbs.img(name) for name in files)
        cards.append(f"<div class='card'>{images}<p><span class='{finding.severity}'>{finding.severity}</span> "
                     f"{html.escape(finding.line().split(': ', 1)[1])}</p></div>")
    more = (f"<p>and {len(findings) - CARDS_PER_KIND} more in check.json</p>"
            if len(findings) > CARDS_PER_KIND else "")
    return f"<h2>{html.escape(kind)} ({len(findings)})</h2><div class='cards'>{''.join(cards)}</div>{more}"


def _label_errors(findings: list[Finding], sources: dict[str, Any], draw: Drawer | None, thumbs: Thumbnails) -> str:
    """Likely label errors, most likely first: the image with its given labels and with the prediction."""
    rows = []
    for rank, finding in enumerate(findings[:CARDS_PER_KIND], 1):
        given = _drawn(draw, sources.get(finding.file, finding.file), finding.given) or thumbs.img(finding.file)
        predicted = _drawn(draw, sources.get(finding.file, finding.file), finding.predicted) or ""
        rows.append(f"<tr><td class='number'>{rank}</td><td class='number'>{finding.score:.3f}</td>"
                    f"<td>{given}</td><td>{predicted}</td><td>{html.escape(finding.file)}<br>"
                    f"{html.escape(finding.message)}</td></tr>")
    head = "<tr><th>rank</th><th>score</th><th>given</th><th>predicted (out of sample)</th><th>file</th></tr>"
    return (f"<h2>Likely label errors ({len(findings)})</h2><p>Lower scores are likelier errors: the label's "
            f"quality against a model that never saw the image.</p><table>{head}{''.join(rows)}</table>")


def _drawn(draw: Drawer | None, source: Any, labels: dict[str, Any] | None) -> str | None:
    if draw is None or labels is None:
        return None
    data = draw(source, labels)
    return f"<img src='data:image/png;base64,{base64.b64encode(data).decode()}' alt='labels'>" if data else None


def _parts_table(result: CheckResult) -> str:
    rows = "".join(f"<tr><td>{html.escape(split)}</td><td>{html.escape(part['format'])}</td>"
                   f"<td class='number'>{part['records']}</td><td>{html.escape(part['where'])}</td></tr>"
                   for split, part in result.parts.items())
    return (f"<h2>Parts</h2><p>model input: {result.input_size} px</p><table><tr><th>part</th><th>format</th>"
            f"<th>records</th><th>where</th></tr>{rows}</table>")


def _class_table(result: CheckResult) -> str:
    splits = [split for split, counts in result.class_counts.items() if counts]
    if not splits:
        return ""
    names = sorted({name for split in splits for name in result.class_counts[split]})
    head = "".join(f"<th>{html.escape(split)}</th>" for split in splits)
    rows = "".join(f"<tr><th>{html.escape(name)}</th>"
                   + "".join(f"<td class='number'>{result.class_counts[split].get(name, 0)}</td>" for split in splits)
                   + "</tr>" for name in names)
    return f"<h2>Class balance</h2><table><tr><th>class</th>{head}</tr>{rows}</table>"


def _sizes_table(result: CheckResult) -> str:
    if not result.sizes:
        return ""
    rows = "".join(f"<tr><th>{key}</th><td class='number'>{values['min']}</td><td class='number'>"
                   f"{values['median']}</td><td class='number'>{values['max']}</td></tr>"
                   for key, values in result.sizes.items() if isinstance(values, dict))
    return f"<h2>Image sizes</h2><table><tr><th></th><th>min</th><th>median</th><th>max</th></tr>{rows}</table>"
