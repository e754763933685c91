"""Reference pages made from the code itself, so they cannot drift from it: every ``train``
setting (``TrainConfig``'s fields), every command's ``--help``, and the fields of the run
summary and of ``visionlora.json``. The documentation site builds them (``docs/hooks.py``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

HELP_WIDTH = "100"  # columns argparse wraps the --help text at, so the pages do not depend on the terminal


def settings_markdown() -> str:
    """A table of every training setting: flag, YAML key, type, default and help."""
    from visionlora.config import config_fields

    lines = [
        "# Training settings",
        "",
        "Every setting of `visionlora train` (and `compare`), made from `TrainConfig` when this site is built.",
        "Each is a flag and a key of the `--config` YAML file (dashes or underscores); flags win over the",
        "file, the file over the task's preset, the preset over the defaults. `None` means the task's preset",
        "(or the model's own value) fills it in.",
        "",
        "| setting | flag | YAML key | type | default | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for field in config_fields():
        flag = "--" + field.name.replace("_", "-")
        if "bool" in str(field.type):
            flag += f" / --no-{field.name.replace('_', '-')}"
        choices = field.metadata.get("choices")
        help_text = field.metadata["help"].replace("%%", "%").replace("|", "\\|")
        if choices:
            help_text += f" (one of: {', '.join(choices)})"
        lines.append(f"| `{field.name}` | `{flag}` | `{field.name}` | `{field.type}` | `{_default(field)}` "
                     f"| {help_text} |")
    return "\n".join(lines) + "\n"


def cli_markdown() -> str:
    """Each command's ``--help``, as the installed command prints it."""
    from visionlora.cli import COMMANDS, build_parser

    lines = ["# Command line", "", "Every command's `--help`, made from the command's own parser when this site "
             "is built.", "", "```text", _help(build_parser("")), "```", ""]
    for command, summary in COMMANDS.items():
        lines += [f"## visionlora {command}", "", summary[0].upper() + summary[1:] + ".", "", "```text",
                  _help(subcommand_parser(command)), "```", ""]
    return "\n".join(lines)


def subcommand_parser(command: str) -> argparse.ArgumentParser:
    """The parser of ``visionlora COMMAND``."""
    from visionlora.cli import build_parser

    parser = build_parser(command)
    actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return actions[0].choices[command]


def schema_markdown() -> str:
    """The fields of ``training_summary.json`` and of ``visionlora.json``, from their dataclasses."""
    from visionlora.reporting import run_summary
    from visionlora.tasks.base import ModelInfo

    lines = ["# Run files", "", "The fields of a run's `training_summary.json` (`RunSummary`, with the parts it nests) "
             "and of `visionlora.json` (`ModelInfo`), made from their classes when this site is built. "
             "`training` also holds every [training setting](settings.md) by its name.", ""]
    parts = [run_summary.RunSummary, run_summary.DataSummary, run_summary.TrainingSummary,
             run_summary.AdapterSummary, run_summary.ParameterCounts, run_summary.Sizes, run_summary.Headline,
             run_summary.Timing, ModelInfo]
    for kind in parts:
        doc = " ".join((kind.__doc__ or "").split())
        lines += [f"## {kind.__name__}", "", doc, "", "| field | type | default |", "|---|---|---|"]
        for field in dataclasses.fields(kind):
            lines.append(f"| `{field.name}` | `{str(field.type).replace('|', '&#124;')}` | `{_default(field)}` |")
        lines.append("")
    return "\n".join(lines)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "required"


def _help(parser: argparse.ArgumentParser) -> str:
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        return parser.format_help().rstrip()
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before
