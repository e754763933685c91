"""Inference latency of the deployment options, at batch 1 and 8, models built from config.

    python benchmarks/export.py [--repeats 5] [--models vit-base,rtdetr-r18,vitpose-base]

For ViT-Base (224 px), RT-DETRv2-R18 (640 px) and ViTPose-B (256x192), each with a LoRA
adapter of the task's preset (a random base; the adapter trained one step on generated data),
it times one forward of: PyTorch with the adapter (peft), PyTorch merged (``visionlora export
--format merged``), and onnxruntime (``--format onnx``, which also checks itself against
torch). Median of ``--repeats`` runs after one warm-up, fp32, this machine's threads; prints
the table and the ratios to the adapter. int8 and adapters over an ONNX base are in
``benchmarks/onnx_serving.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

MODELS = {
    "vit-base": ("classification", "ViT-Base/16 224px"),
    "rtdetr-r18": ("detection", "RT-DETRv2-R18 640px"),
    "vitpose-base": ("pose", "ViTPose-B 256x192"),
}


def base_model(name: str, labels: list[str]):
    """(model, processor) of the full-size architecture, random weights."""
    import transformers as t

    maps = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    if name == "vit-base":
        return (t.ViTForImageClassification(t.ViTConfig(num_labels=len(labels), **maps)),
                t.ViTImageProcessorPil(size={"height": 224, "width": 224}))
    if name == "rtdetr-r18":
        backbone = t.RTDetrResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                        downsample_in_bottleneck=False, out_indices=[2, 3, 4])
        config = t.RTDetrV2Config(backbone_config=backbone, encoder_in_channels=[128, 256, 512],
                                  num_labels=len(labels), tie_word_embeddings=False, **maps)
        return t.RTDetrV2ForObjectDetection(config), t.RTDetrImageProcessorPil(size={"height": 640, "width": 640})
    config = t.VitPoseConfig(backbone_config=t.VitPoseBackboneConfig(out_indices=[12]), num_labels=len(labels))
    return t.VitPoseForPoseEstimation(config), t.VitPoseImageProcessorPil(size={"height": 256, "width": 192})


def make_run(name: str, root: Path, output: str = "run") -> tuple[Path, Path]:
    """A LoRA run of the task's preset over a saved random base, trained for one step on generated
    data (so it has a real summary and a non-zero adapter), and that data."""
    from visionlora.config import TrainConfig
    from visionlora.examples.synthetic import make_classification_folder, make_detection_dataset, make_pose_dataset
    from visionlora.tasks import get_task
    from visionlora.training.engine import train

    task_name = MODELS[name][0]
    data = root / "data"
    if not data.exists():
        if task_name == "classification":
            make_classification_folder(data, per_class_train=2, per_class_val=2)
            labels = sorted(p.name for p in (data / "train").iterdir())
        elif task_name == "detection":
            make_detection_dataset(data, "coco", n_train=2, n_val=2)
            labels = ["red_box", "blue_box"]
        else:
            make_pose_dataset(data, "coco", n_train=2, n_val=2)
            labels = ["snout", "leftear", "rightear", "tailbase"]
        model, processor = base_model(name, labels)
        model.save_pretrained(root / "base")
        processor.save_pretrained(root / "base")
    preset = get_task(task_name).preset
    cfg = TrainConfig(task=task_name, data=str(data), model=str(root / "base"), epochs=1, max_steps=1,
                      batch_size=2, output=str(root / output), progress=False, mixed_precision="no",
                      lora_r=preset.lora_r, lora_alpha=preset.lora_alpha, target_modules=list(preset.target_modules),
                      lr=preset.lr_lora).validate()
    return train(cfg).paths.root, data


def median_forward(model, inputs: dict, repeats: int, kwargs: dict) -> float:
    import torch

    with torch.inference_mode():
        model(**inputs, **kwargs)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(**inputs, **kwargs)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(name: str, repeats: int) -> list[dict]:
    import visionlora
    from visionlora.deploy.export import export_run

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, _ = make_run(name, Path(tmp))
        for fmt in ("merged", "onnx"):  # random weights: near-tied scores can decode differently, so no refusal
            export_run(run_dir, Path(tmp) / fmt, fmt, strict=False)
        record = json.loads((Path(tmp) / "onnx" / "export.json").read_text())
        loaded = {"PyTorch + adapter": visionlora.load(run_dir, device="cpu"),
                  "PyTorch merged": visionlora.load(Path(tmp) / "merged", device="cpu"),
                  "onnxruntime": visionlora.load(Path(tmp) / "onnx")}
        reference = loaded["PyTorch + adapter"]
        from PIL import Image

        image = Image.new("RGB", (640, 480), (90, 140, 200))
        for batch in (1, 8):
            items = [item for i in range(batch) for item in
                     reference.task.prediction.predict_inputs(image, i, reference.processor, reference.info,
                                                   reference.task.prediction.default_options())]
            inputs = reference.task.prediction.model_inputs([item.pixel_values for item in items])
            adapter_seconds = None
            for setup, run in loaded.items():
                seconds = median_forward(run.model, inputs, repeats, run.info.forward_kwargs)
                adapter_seconds = adapter_seconds or seconds
                rows.append({"model": MODELS[name][1], "batch": batch, "setup": setup, "ms": 1000 * seconds,
                             "vs adapter": adapter_seconds / seconds})
        rows[-1]["onnx |diff|"] = record["onnx_max_abs_diff"]
        rows[-1]["verified"] = record["verified"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        rows += measure(name, args.repeats)
    print("median forward latency (fp32; 'vs adapter' > 1 is faster than PyTorch with the adapter)")
    print(table(rows, ["model", "batch", "setup", "ms", "vs adapter", "onnx |diff|", "verified"]))


if __name__ == "__main__":
    main()
