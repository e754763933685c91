"""The built-in example: images shifted from what the small pretrained built-in models learnt
(new shapes, a new skeleton), LoRA and full fine-tuning of those models, a table. Each task
declares its part (``Task.demo``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from visionlora.config import TrainConfig
from visionlora.errors import VisionLoraError
from visionlora.tasks import get_task, task_names
from visionlora.tasks.base import DemoRecipe

# The small pretrained bases learn at higher rates than the presets (tuned for ViT-B-sized
# checkpoints); full fine-tuning takes a lower one than LoRA, as usual. A recipe may set its own.
DEMO_LR = {"lora": 1e-3, "full": 2e-4}
LEVEL_FRACTION = 0.05  # LoRA within this fraction of full's metric counts as level with it
WHY_LORA_TRAILS = "docs/lora.md, 'The demo'"


def demo_tasks() -> tuple[str, ...]:
    """The tasks that declare a demo (``Task.demo``), in the registry's order."""
    return tuple(name for name in task_names() if get_task(name).demo is not None)


def run_demo(output: Path, tasks: tuple[str, ...] | None = None) -> list[dict]:
    """Generate each task's data, fine-tune its pretrained tiny model with LoRA and fully, print a table."""
    output = Path(output)
    rows = []
    for task_name in tasks or demo_tasks():
        recipe = recipe_of(task_name)
        data = output / "data" / task_name
        shutil.rmtree(data, ignore_errors=True)
        recipe.generate(data)
        print(f"generated {data} ({recipe.description})")
        for mode in ("lora", "full"):
            rows.append(_train_one(task_name, data, mode, output))
    print()
    print(format_table(rows))
    return rows


def recipe_of(task_name: str) -> DemoRecipe:
    """The task's demo recipe, or a clear error for a task without one."""
    recipe = get_task(task_name).demo
    if recipe is None:
        raise VisionLoraError(f"the {task_name} task has no demo")
    return recipe


def demo_settings(task_name: str, mode: str) -> dict:
    """The settings of ``mode`` in the task's demo: the preset's, the recipe's base model and
    ``DEMO_LR``, then what the recipe sets for that mode."""
    recipe = recipe_of(task_name)
    settings = get_task(task_name).preset.settings(mode)
    settings.update(model=recipe.model, lr=DEMO_LR[mode])
    settings.update(recipe.settings.get(mode, {}))
    return settings


def _train_one(task_name: str, data: Path, mode: str, output: Path) -> dict:
    from visionlora.training.engine import train

    preset = demo_settings(task_name, mode)
    cfg = TrainConfig(
        task=task_name,
        data=str(data),
        mode=mode,
        epochs=recipe_of(task_name).epochs,
        batch_size=16,
        output=str(output / f"{task_name}-{mode}"),
        overwrite=True,
        progress=False,
        **preset,
    )
    summary = train(cfg).summary
    if summary is None:  # only the main process of a distributed run has one; the demo runs in one process
        raise VisionLoraError("the demo runs in one process (not under accelerate launch or torchrun)")
    return {
        "task": task_name,
        "mode": mode,
        "metric": summary["main_metric"],
        "value": summary["metrics"][summary["main_metric"]],
        "baseline": summary["metrics"].get("mean_baseline_pixel_error"),
        "trainable_percent": summary["parameters"]["trainable_percent"],
        "weights_bytes": summary["sizes"]["weights_file_bytes"],
        "seconds": summary["time"]["wall_seconds"],
        "lr": cfg.lr,
        "run": summary["run_dir"],
    }


def format_table(rows: list[dict]) -> str:
    """One line per run, and under each task's pair a line saying what it shows."""
    header = f"{'task':<16}{'mode':<6}{'main metric':<34}{'lr':>8}{'trainable':>10}{'weights':>11}{'time':>8}  run"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(_format_row(row))
        pair = [other for other in rows if other["task"] == row["task"]]
        if row is pair[-1] and len(pair) == 2:
            lines.append(f"  -> {verdict(*sorted(pair, key=lambda r: r['mode'] != 'lora'))}")
    return "\n".join(lines)


def _format_row(row: dict) -> str:
    metric = f"{row['metric']} {row['value']:.3f}"
    if row.get("baseline") is not None:
        metric += f" (mean {row['baseline']:.1f})"
    lr = f"{row['lr']:.0e}" if row.get("lr") else ""
    return (f"{row['task']:<16}{row['mode']:<6}{metric:<34}{lr:>8}{row['trainable_percent']:>9.2f}%"
            f"{row['weights_bytes'] / 1024:>9.0f}KB{row['seconds']:>7.1f}s  {row['run']}")


def verdict(lora: dict, full: dict) -> str:
    """What a task's LoRA and full rows show, in one line: LoRA's share and size, then level, ahead or behind."""
    greater_is_better = get_task(lora["task"]).greater_is_better
    gain = (lora["value"] - full["value"]) * (1 if greater_is_better else -1)
    cost = (f"LoRA trains {lora['trainable_percent']:.1f}% of the weights, saves "
            f"{lora['weights_bytes'] / 1024:.0f} KB (full {full['weights_bytes'] / 1024:.0f} KB)")
    difference = f"{abs(gain):.3f} {lora['metric']}"
    if abs(gain) <= LEVEL_FRACTION * abs(full["value"]):
        outcome = f"{cost}, and is level with full (within {difference})"
    elif gain > 0:
        outcome = f"{cost}, and beats full by {difference}"
    else:
        outcome = f"{cost}; LoRA LOSES to full here, by {difference} (why: {WHY_LORA_TRAILS})"
    return outcome + _against_baseline(lora, full)


def _against_baseline(lora: dict, full: dict) -> str:
    """A warning when neither mode beats the mean-position baseline (pose), else nothing."""
    baseline = lora.get("baseline")
    if baseline is None or min(lora["value"], full["value"]) < baseline:
        return ""
    return f"; neither beats predicting the mean position ({baseline:.1f})"
