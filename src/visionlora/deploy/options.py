"""A run's predict arguments from the values given for every task's declared options and writers.

The command line has one flag per option, writer and box option that any task declares;
``task_arguments`` keeps those of the run's own task, parsed by the task, and refuses the
ones another task declares.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

from visionlora.core.labelling import LabelFormat
from visionlora.errors import VisionLoraError
from visionlora.tasks import get_task, task_names

if TYPE_CHECKING:
    from visionlora.tasks.base import Task


class TaskArguments(NamedTuple):
    """The run's task options (parsed), its box options' values and its writers' targets."""

    options: dict[str, Any]
    box_values: dict[str, Any]
    outputs: dict[str, Path]


def task_arguments(given: Mapping[str, Any], task: Task, run_root: Path) -> TaskArguments:
    """The arguments for a run of ``task`` from ``given`` (each declared item's name -> its text,
    None or absent when not given).

    An option or writer that another task declares is a clear error for this run.
    """
    own = {item.name for item in _declared(task)}
    for name in task_names():
        for item in _declared(get_task(name)):
            if item.name not in own and given.get(item.name) is not None:
                raise VisionLoraError(f"{item.flag} is a {name} option; {run_root} is a {task.name} run")

    def parsed(items) -> dict[str, Any]:
        return {item.name: item.parse(given[item.name]) for item in items if given.get(item.name) is not None}

    outputs = {w.name: Path(given[w.name]) for w in task.writers if given.get(w.name) is not None}
    return TaskArguments(parsed(task.predict_options), parsed(task.box_options), outputs)


def label_format(task: Task, name: str) -> LabelFormat:
    """The pre-label format ``name`` of ``task`` (``predict --format``), or a clear error naming its formats."""
    for known in task.label_formats:
        if known.name == name:
            return known
    own = ", ".join(known.name for known in task.label_formats) or "none"
    everywhere = sorted({f.name for task_name in task_names() for f in get_task(task_name).label_formats})
    if name not in everywhere:
        raise VisionLoraError(f"--format {name}: not a pre-label format (known: {', '.join(everywhere)})")
    raise VisionLoraError(f"--format {name}: a {task.name} run writes pre-labels as {own}")


def _declared(task: Task) -> tuple:
    return (*task.writers, *task.predict_options, *task.box_options)
