"""The built-in example: generated images, LoRA and full training with tiny models, a table."""

from __future__ import annotations

import shutil
from pathlib import Path

from visionlora.config import TrainConfig
from visionlora.synthetic import make_classification_folder
from visionlora.tasks import get_task

DEMO_EPOCHS = 8
# The tiny models start from random weights, so they learn faster with a higher rate than
# the presets (which are tuned for pretrained checkpoints).
DEMO_LR = 1e-3


def run_demo(output: Path) -> list[dict]:
    """Train every demo configuration under ``output`` and print where things are."""
    output = Path(output)
    data = output / "data" / "classification"
    shutil.rmtree(data, ignore_errors=True)
    make_classification_folder(data, per_class_train=40, per_class_val=12)
    print(f"generated {data} (4 colour classes, 160 train / 48 val images)")
    rows = []
    for mode in ("lora", "full"):
        rows.append(_train_one("classification", data, mode, output))
    print()
    print(format_table(rows))
    return rows


def _train_one(task_name: str, data: Path, mode: str, output: Path) -> dict:
    from visionlora.engine import train

    preset = get_task(task_name).preset.settings(mode)
    preset["model"] = "tiny"
    cfg = TrainConfig(
        task=task_name,
        data=str(data),
        mode=mode,
        epochs=DEMO_EPOCHS,
        batch_size=16,
        output=str(output / f"{task_name}-{mode}"),
        overwrite=True,
        progress=False,
        **{k: v for k, v in preset.items()},
    )
    cfg.lr = DEMO_LR
    summary = train(cfg).summary
    return {
        "task": task_name,
        "mode": mode,
        "metric": summary["main_metric"],
        "value": summary["metrics"][summary["main_metric"]],
        "trainable_percent": summary["parameters"]["trainable_percent"],
        "weights_bytes": summary["sizes"]["weights_file_bytes"],
        "seconds": summary["time"]["wall_seconds"],
        "run": summary["run_dir"],
    }


def format_table(rows: list[dict]) -> str:
    header = f"{'task':<16}{'mode':<6}{'main metric':<22}{'trainable':>10}{'weights':>11}{'time':>8}  run"
    lines = [header, "-" * len(header)]
    for row in rows:
        metric = f"{row['metric']} {row['value']:.3f}"
        lines.append(
            f"{row['task']:<16}{row['mode']:<6}{metric:<22}{row['trainable_percent']:>9.2f}%"
            f"{row['weights_bytes'] / 1024:>9.0f}KB{row['seconds']:>7.1f}s  {row['run']}"
        )
    return "\n".join(lines)
