"""The built-in example: generated images, LoRA and full fine-tuning of the small pretrained
built-in models, a table."""

from __future__ import annotations

import shutil
from pathlib import Path

from visionlora.config import TrainConfig
from visionlora.examples.synthetic import make_classification_folder, make_detection_dataset, make_pose_dataset
from visionlora.tasks import get_task

# The small pretrained bases learn at higher rates than the presets (tuned for ViT-B-sized
# checkpoints); full fine-tuning takes a lower one than LoRA, as usual. A random base learns
# everything anew, at the higher rate in both modes.
DEMO_LR = {"lora": 1e-3, "full": 2e-4}
RANDOM_BASE_LR = 1e-3


DEMO_DATA = {
    "classification": ("4 colour classes, 160 train / 48 val images",
                       lambda root: make_classification_folder(root, per_class_train=40, per_class_val=12)),
    "detection": ("2 box classes, COCO JSON, 40 train / 12 val images",
                  lambda root: make_detection_dataset(root, "coco", n_train=40, n_val=12)),
    "pose": ("4 keypoints, DeepLabCut project, 48 frames",
             lambda root: make_pose_dataset(root, "dlc", n_train=40, n_val=8)),
}
DEMO_EPOCHS = {"classification": 8, "detection": 30, "pose": 40}
# Pretrained on procedural shapes and scenes (see visionlora.examples.procedural); RT-DETRv2 converges in
# tens of epochs where DETR needs hundreds. The pose twin, pretrained on 11-keypoint walkers,
# does not transfer to this 4-keypoint animal with 40 frames (worse than the mean position;
# see benchmarks/lora_vs_full.py), so pose starts from the random tiny ViTPose.
DEMO_MODELS = {"classification": "tiny-pretrained", "detection": "tiny-rtdetr-pretrained", "pose": "tiny"}


def run_demo(output: Path, tasks: tuple[str, ...] = tuple(DEMO_DATA)) -> list[dict]:
    """Generate each task's data, fine-tune the pretrained tiny models with LoRA and fully, print a table."""
    output = Path(output)
    rows = []
    for task_name in tasks:
        description, make = DEMO_DATA[task_name]
        data = output / "data" / task_name
        shutil.rmtree(data, ignore_errors=True)
        make(data)
        print(f"generated {data} ({description})")
        for mode in ("lora", "full"):
            rows.append(_train_one(task_name, data, mode, output))
    print()
    print(format_table(rows))
    return rows


def _train_one(task_name: str, data: Path, mode: str, output: Path) -> dict:
    from visionlora.training.engine import train

    preset = get_task(task_name).preset.settings(mode)
    preset["model"] = DEMO_MODELS[task_name]
    cfg = TrainConfig(
        task=task_name,
        data=str(data),
        mode=mode,
        epochs=DEMO_EPOCHS[task_name],
        batch_size=16,
        output=str(output / f"{task_name}-{mode}"),
        overwrite=True,
        progress=False,
        **{k: v for k, v in preset.items()},
    )
    cfg.lr = DEMO_LR[mode] if preset["model"].endswith("-pretrained") else RANDOM_BASE_LR
    summary = train(cfg).summary
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
