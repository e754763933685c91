"""visionlora train vs a reference that wires transformers' Trainer and peft by hand.

    python benchmarks/vs_reference.py [--sizes tiny,base] [--epochs 3]

visionlora runs with its defaults (``--mixed-precision auto``: bf16 on CPUs and GPUs that
run it natively). The reference runs twice: as its docs run it (fp32), and with
``bf16=True`` in its TrainingArguments, at the same precision as visionlora here.

The reference follows peft's image-classification example: an ``imagefolder`` dataset
with a transform applied on the fly (the JPEGs are decoded every epoch), a LoraConfig with
r 16, alpha 16, query/value targets (resolved to q_proj/v_proj), dropout 0.1 and the
classifier in modules_to_save, and a Trainer that evaluates and saves every epoch and keeps
the best model. visionlora trains the same model (saved once from config, random weights),
data, LoRA settings, batch and epochs. Each run is a separate process; images/s is end to
end: training images x epochs / wall time of the whole command.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

SIZES = {"tiny": (32, "tiny ViT (2x64), 32px"), "base": (224, "ViT-Base/16, 224px")}
TRAIN_IMAGES = {"tiny": 400, "base": 48}
BATCH = 8


def make_inputs(root: Path, size: str) -> tuple[Path, Path]:
    """A JPEG ImageFolder (train/ + val/) and a saved random-weight base model of that size."""
    import numpy as np
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    from visionlora.examples.synthetic import CLASS_COLOURS, classification_image

    pixels, _ = SIZES[size]
    data = root / "data"
    rng = np.random.default_rng(0)
    per_class = TRAIN_IMAGES[size] // len(CLASS_COLOURS)
    for split, count in (("train", per_class), ("val", max(2, per_class // 4))):
        for label in CLASS_COLOURS:
            folder = data / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                classification_image(label, rng, size=256).save(folder / f"{i:04d}.jpg", quality=90)
    if size == "tiny":
        config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           image_size=32, patch_size=4, num_labels=len(CLASS_COLOURS))
    else:
        config = ViTConfig(num_labels=len(CLASS_COLOURS))
    config.id2label = dict(enumerate(sorted(CLASS_COLOURS)))
    config.label2id = {v: k for k, v in config.id2label.items()}
    model_dir = root / "base"
    ViTForImageClassification(config).save_pretrained(model_dir)
    ViTImageProcessorPil(size={"height": pixels, "width": pixels}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(model_dir)
    return data, model_dir


REFERENCE = r'''
import sys, numpy as np, torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments
import albumentations as A

data, model_dir, out, epochs, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
bf16 = sys.argv[6] == "bf16"
dataset = load_dataset("imagefolder", data_dir=data)
labels = dataset["train"].features["label"].names
processor = AutoImageProcessor.from_pretrained(model_dir)
size = (processor.size["height"], processor.size["width"])
train_aug = A.Compose([A.RandomResizedCrop(size=size), A.HorizontalFlip()])
mean, std = np.array(processor.image_mean), np.array(processor.image_std)

def to_tensor(array):
    return torch.from_numpy(((array / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32))

def train_transform(batch):
    batch["pixel_values"] = [to_tensor(train_aug(image=np.asarray(im.convert("RGB")))["image"])
                             for im in batch["image"]]
    return batch

def val_transform(batch):
    batch["pixel_values"] = [to_tensor(np.asarray(im.convert("RGB").resize(size[::-1]))) for im in batch["image"]]
    return batch

dataset["train"].set_transform(train_transform)
dataset["validation"].set_transform(val_transform)
model = AutoModelForImageClassification.from_pretrained(model_dir, num_labels=len(labels), ignore_mismatched_sizes=True)
config = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, bias="none",
                    modules_to_save=["classifier"])
model = get_peft_model(model, config)

def collate(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}

def compute_metrics(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, axis=1) == prediction.label_ids).mean())}

args = TrainingArguments(out, remove_unused_columns=False, eval_strategy="epoch", save_strategy="epoch",
    learning_rate=2e-4, per_device_train_batch_size=batch, per_device_eval_batch_size=batch, num_train_epochs=epochs,
    logging_steps=10, load_best_model_at_end=True, metric_for_best_model="accuracy", report_to=[],
    use_cpu=not torch.cuda.is_available(), seed=42, bf16=bf16)
trainer = Trainer(model, args, train_dataset=dataset["train"], eval_dataset=dataset["validation"],
    data_collator=collate, compute_metrics=compute_metrics)
trainer.train()
print("accuracy", trainer.evaluate()["eval_accuracy"])
model.save_pretrained(out + "/adapter")
'''


def timed(command: list[str]) -> float:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}... failed:\n{completed.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="tiny,base")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            data, model_dir = make_inputs(root, size)
            images = TRAIN_IMAGES[size] * args.epochs
            script = root / "reference.py"
            script.write_text(REFERENCE)
            reference = {precision: timed([sys.executable, str(script), str(data), str(model_dir),
                                           str(root / f"ref-{precision}"), str(args.epochs), str(BATCH), precision])
                         for precision in ("fp32", "bf16")}
            ours = timed([sys.executable, "-m", "visionlora", "train", "--data", str(data), "--model", str(model_dir),
                          "--epochs", str(args.epochs), "--batch-size", str(BATCH), "--lr", "2e-4",
                          "--lora-alpha", "16", "--lora-dropout", "0.1", "--no-progress",
                          "--output", str(root / "ours")])
        rows.append({"size": SIZES[size][1], "train images x epochs": images,
                     "reference fp32 images/s": images / reference["fp32"],
                     "reference bf16 images/s": images / reference["bf16"], "visionlora images/s": images / ours,
                     "visionlora/reference fp32": reference["fp32"] / ours,
                     "visionlora/reference bf16": reference["bf16"] / ours})
    print(table(rows, ["size", "train images x epochs", "reference fp32 images/s", "reference bf16 images/s",
                       "visionlora images/s", "visionlora/reference fp32", "visionlora/reference bf16"]))


if __name__ == "__main__":
    main()
