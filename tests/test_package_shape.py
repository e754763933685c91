"""The package's shape: task knowledge stays in its task's package, and every task's
declarations are complete enough for the shared modules that read them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import visionlora
from visionlora.data.formats import FORMATS
from visionlora.tasks import get_task, task_names

PACKAGE = Path(visionlora.__file__).parent
NOT_A_TASK = "not a task name"  # a comment marking a data format's field that shares a task's name


def task_name_literals(source: str) -> list[int]:
    """Lines of ``source`` holding a task's name as a string literal."""
    tree = ast.parse(source)
    names, lines = set(task_names()), source.splitlines()
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in names and NOT_A_TASK not in lines[node.lineno - 1]]


def test_no_task_name_is_written_outside_the_tasks_packages():
    leaks = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "tasks":
            continue
        lines = task_name_literals(path.read_text())
        if lines:
            leaks[str(relative)] = lines
    assert not leaks, f"task names written outside tasks/ (file: lines): {leaks}"


def test_the_literal_check_finds_a_task_name():
    name = task_names()[0]
    assert task_name_literals(f'if task == "{name}":\n    pass\n') == [1]
    assert task_name_literals(f'FIELD = "{name}"  # {NOT_A_TASK}\n') == []


@pytest.mark.parametrize("name", task_names())
def test_each_task_declares_what_the_shared_modules_read(name, tmp_path):
    task = get_task(name)
    assert task.name == name
    assert task.data_formats and all(fmt in FORMATS for fmt in task.data_formats)
    for declared in ("main_metric", "auto_class", "pipeline_tag", "card_does", "output_names"):
        assert getattr(task, declared), f"{name} declares no {declared}"
    assert task.builtin_models, f"{name} has no built-in model"
    assert type(task).__module__.startswith(f"visionlora.tasks.{name}.")
    if task.demo is not None:  # the demo's generated data is data the task reads
        task.demo.generate(tmp_path / "demo")
        assert task.data.read_part(tmp_path / "demo" / "train" if (tmp_path / "demo" / "train").is_dir()
                              else tmp_path / "demo").records
