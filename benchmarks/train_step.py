"""LoRA vs full training step at the tasks' real sizes, models built from config (random weights).

    python benchmarks/train_step.py [--tasks classification,detection,pose] [--steps 3]
                                    [--precisions fp32,bf16] [--low-memory]

Each configuration runs in its own process, on a GPU where there is one (CUDA, then MPS), with
the step timed from an idle device to an idle device; prints median seconds per optimizer step,
peak process memory (RSS), and the LoRA/full ratios in each precision (bf16: autocast, as
``--mixed-precision bf16`` trains); with --low-memory also the same pairs with visionlora's
--low-memory allocator setting. The step is visionlora's: the task's loss, backward,
gradient clipping, AdamW over the trainable parameters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_device, median_seconds, report, run_isolated, table  # noqa: E402

SIZES = {
    "classification": "ViT-Base/16 224px, batch 8",
    "detection": "DETR-R50 512x512px, batch 2",
    "pose": "ViTPose-B 256x192px, batch 8",
}


def build(task_name: str):
    """(model, batch, head names, task) at the real size."""
    import torch

    from visionlora.tasks import get_task

    task = get_task(task_name)
    generator = torch.Generator().manual_seed(0)
    if task_name == "classification":
        from transformers import ViTConfig, ViTForImageClassification

        model = ViTForImageClassification(ViTConfig(num_labels=10))
        batch = {"pixel_values": torch.randn(8, 3, 224, 224, generator=generator), "labels": torch.arange(8) % 10}
    elif task_name == "detection":
        from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

        config = DetrConfig(backbone_config=ResNetConfig(out_features=["stage4"]), use_timm_backbone=False,
                            use_pretrained_backbone=False, num_labels=5)
        model = DetrForObjectDetection(config)
        labels = [{"class_labels": torch.tensor([1, 3]),
                   "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])}] * 2
        batch = {"pixel_values": torch.randn(2, 3, 512, 512, generator=generator),
                 "pixel_mask": torch.ones(2, 512, 512, dtype=torch.long), "labels": labels}
    else:
        from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

        model = VitPoseForPoseEstimation(VitPoseConfig(backbone_config=VitPoseBackboneConfig(out_indices=[12]),
                                                       num_labels=17))
        batch = {"pixel_values": torch.randn(8, 3, 256, 192, generator=generator),
                 "target": torch.rand(8, 17, 64, 48, generator=generator), "weight": torch.ones(8, 17)}
    return model, batch, task


def worker(task_name: str, mode: str, steps: int, low_memory: bool, precision: str) -> None:
    import torch

    if low_memory:
        from visionlora.runtime import return_freed_memory

        return_freed_memory()
    from visionlora.modeling.adapters import apply_adapter, lower_frozen_weights, parameter_counts
    from visionlora.tasks.base import ModelInfo

    torch.manual_seed(0)
    device = torch.device(bench_device())
    model, batch, task = build(task_name)
    model.to(device)
    batch = {key: _on(value, device) for key, value in batch.items()}
    if mode == "lora":
        preset = task.preset
        model, _ = apply_adapter(model, preset.lora_r, preset.lora_alpha, 0.0, list(preset.target_modules),
                              task.model.head_modules(model))
        if precision == "bf16":  # as training does: frozen layer weights stored in bf16 under bf16 autocast
            lower_frozen_weights(model, torch.bfloat16)
    model.train()
    info = ModelInfo(task=task_name, mode=mode, base_model="config", labels=[], image_size={})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = task.steps.loss(model, batch, info)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_seconds(step, steps)
    report({"task": task_name, "mode": mode, "device": device.type, "s_per_step": seconds, **parameter_counts(model)})


def _on(value, device):
    """A batch value (a tensor, or DETR's list of target dicts) on ``device``."""
    if isinstance(value, list):
        return [{key: tensor.to(device) for key, tensor in item.items()} for item in value]
    return value.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="classification,detection,pose")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    parser.add_argument("--low-memory", action="store_true", help="also measure with --low-memory")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.rest[0], args.rest[1], int(args.rest[2]), args.rest[3] == "low", args.rest[4])
        return
    rows = []
    variants = ["default", "low"] if args.low_memory else ["default"]
    for task_name in args.tasks.split(","):
        for precision in args.precisions.split(","):
            for variant in variants:
                results = {mode: run_isolated(__file__, [task_name, mode, str(args.steps), variant, precision])
                           for mode in ("lora", "full")}
                label = "" if variant == "default" else " low-mem"
                for mode, result in results.items():
                    rows.append({"task": task_name, "size": SIZES[task_name], "precision": precision,
                                 "mode": mode + label, "trainable %": result["trainable_percent"],
                                 "s/step": result["s_per_step"], "peak RSS MB": result["peak_rss_mb"]})
                rows.append({"task": task_name, "size": "", "precision": precision, "mode": "LoRA/full" + label,
                             "s/step": results["lora"]["s_per_step"] / results["full"]["s_per_step"],
                             "peak RSS MB": results["lora"]["peak_rss_mb"] / results["full"]["peak_rss_mb"]})
    print(table(rows, ["task", "size", "precision", "mode", "trainable %", "s/step", "peak RSS MB"]))


if __name__ == "__main__":
    main()
