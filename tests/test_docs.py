"""The documentation: its generated reference covers every setting and command, and its
runnable blocks run as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readme import runnable_blocks
from visionlora.cli import COMMANDS
from visionlora.config import config_fields
from visionlora.reference import cli_markdown, schema_markdown, settings_markdown


def test_the_settings_reference_lists_every_train_setting():
    page = settings_markdown()
    for field in config_fields():
        flag = "--" + field.name.replace("_", "-")
        assert f"| `{field.name}` | `{flag}" in page, field.name
        assert field.metadata["help"].split("(")[0].strip()[:30].replace("%%", "%") in page, field.name


def test_the_command_reference_has_every_command_and_its_flags():
    page = cli_markdown()
    for command in COMMANDS:
        assert f"## visionlora {command}" in page and f"usage: visionlora {command}" in page, command
    assert "--quantize {int8}" in page and "--num-workers NUM_WORKERS" in page and "--threads N" in page


def test_the_run_files_reference_has_the_summary_and_model_description_fields():
    page = schema_markdown()
    for field in ("mixed_precision_reason", "data_loading", "base_revision", "forward_kwargs", "headline"):
        assert f"`{field}`" in page, field


@pytest.mark.parametrize("where,code", runnable_blocks(), ids=lambda value: value if value.endswith(".md") else "")
def test_runnable_blocks_run_as_written(where, code, tmp_path):
    """Each line of a block marked runnable, in a fresh folder, offline, with this environment's commands."""
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"{where}:\n{code}\n{completed.stderr[-3000:]}"
