"""The built-in example: generated images, LoRA and full fine-tuning of the small pretrained
built-in models, a table. Each task declares its part (``Task.demo``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from visionlora.config import TrainConfig
from visionlora.errors import VisionLoraError
from visionlora.tasks import get_task, task_names

# The small pretrained bases learn at higher rates than the presets (tuned for ViT-B-sized
# checkpoints); full fine-tuning takes a lower one than LoRA, as usual. A random base learns
# everything anew, at the higher rate in both modes.
DEMO_LR = {"lora": 1e-3, "full": 2e-4}
RANDOM_BASE_LR = 1e-3


def demo_tasks() -> tuple[str, ...]:
    """The tasks that declare a demo (``Task.demo``), in the registry's order."""
    return tuple(name for name in task_names() if get_task(name).demo is not None)


def run_demo(output: Path, tasks: tuple[str, ...] | None = None) -> list[dict]:
    """Generate each task's data, fine-tune the pretrained tiny models with LoRA and fully, print a table."""
    output = Path(output)
    rows = []
    for task_name in tasks or demo_tasks():
        recipe = get_task(task_name).demo
        if recipe is None:
            raise VisionLoraError(f"the {task_name} task has no demo")
        data = output / "data" / task_name
        shutil.rmtree(data, ignore_errors=True)
        recipe.generate(data)
        print(f"generated {data} ({recipe.description})")
        for mode in ("lora", "full"):
            rows.append(_train_one(task_name, recipe.model, recipe.epochs, data, mode, output))
    print()
    print(format_table(rows))
    return rows


def _train_one(task_name: str, model: str, epochs: int, data: Path, mode: str, output: Path) -> dict:
    from visionlora.training.engine import train

    preset = get_task(task_name).preset.settings(mode)
    preset["model"] = model
    cfg = TrainConfig(
        task=task_name,
        data=str(data),
        mode=mode,
        epochs=epochs,
        batch_size=16,
        output=str(output / f"{task_name}-{mode}"),
        overwrite=True,
        progress=False,
        **{k: v for k, v in preset.items()},
    )
    cfg.lr = DEMO_LR[mode] if preset["model"].endswith("-pretrained") else RANDOM_BASE_LR
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
        "run": summary["run_dir"],
    }


def format_table(rows: list[dict]) -> str:
    header = f"{'task':<16}{'mode':<6}{'main metric':<34}{'trainable':>10}{'weights':>11}{'time':>8}  run"
    lines = [header, "-" * len(header)]
    for row in rows:
        metric = f"{row['metric']} {row['value']:.3f}"
        if row.get("baseline") is not None:
            metric += f" (mean {row['baseline']:.1f})"
        lines.append(
            f"{row['task']:<16}{row['mode']:<6}{metric:<34}{row['trainable_percent']:>9.2f}%"
            f"{row['weights_bytes'] / 1024:>9.0f}KB{row['seconds']:>7.1f}s  {row['run']}"
        )
    return "\n".join(lines)
