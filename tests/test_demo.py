"""``visionlora demo``: each task's recipe starts from its pretrained twin, and the table says
what each pair of rows shows, plainly when LoRA loses."""

from __future__ import annotations

import pytest

from visionlora.demo import demo_settings, demo_tasks, format_table
from visionlora.modeling.builtin import PRETRAINED_SUFFIX, pretrained_folder
from visionlora.tasks import get_task


@pytest.mark.parametrize("name", demo_tasks())
def test_every_demo_starts_from_its_pretrained_twin(name):
    recipe = get_task(name).demo
    assert recipe.model.endswith(PRETRAINED_SUFFIX)
    assert pretrained_folder(name, get_task(name).builtin_models, recipe.model) is not None
    assert set(recipe.settings) <= {"lora", "full"}
    assert demo_settings(name, "lora")["model"] == recipe.model


def _pair(task: str, lora: float, full: float, baseline: float | None = None) -> list[dict]:
    common = {"task": task, "metric": get_task(task).main_metric, "baseline": baseline, "seconds": 1.0,
              "lr": 1e-3, "run": "runs/x"}
    return [{**common, "mode": "lora", "value": lora, "trainable_percent": 2.5, "weights_bytes": 40 * 1024},
            {**common, "mode": "full", "value": full, "trainable_percent": 100.0, "weights_bytes": 900 * 1024}]


def _verdict_line(rows: list[dict]) -> str:
    return format_table(rows).splitlines()[-1]


def test_the_table_says_when_lora_is_level_ahead_or_behind():
    higher = next(name for name in demo_tasks() if get_task(name).greater_is_better)
    level, ahead, behind = (_verdict_line(_pair(higher, lora, 0.60)) for lora in (0.59, 0.70, 0.40))
    assert "LoRA trains 2.5% of the weights, saves 40 KB (full 900 KB)" in level
    assert "level with full (within 0.010" in level
    assert "beats full by 0.100" in ahead
    assert "LoRA LOSES to full here, by 0.200" in behind and "docs/lora.md" in behind


def test_lower_is_better_and_the_mean_position_is_named():
    lower = next((name for name in demo_tasks() if not get_task(name).greater_is_better), None)
    if lower is None:
        pytest.skip("no demo with a metric where lower is better")
    assert "beats full by 1.000" in _verdict_line(_pair(lower, 5.0, 6.0, baseline=8.0))
    assert "neither beats predicting the mean position (4.0)" in _verdict_line(_pair(lower, 5.0, 6.0, baseline=4.0))
