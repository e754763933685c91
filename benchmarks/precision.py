"""Does bf16 training change results? LoRA on a pretrained base in bf16 and in fp32, over seeds.

    python benchmarks/precision.py [--seeds 0,1,2] [--epochs 8]

A tiny ViT is first trained in full (fp32) by visionlora on generated images of four
classes (the "pretrained" base); LoRA runs then learn a new three-class head from two
images per class on that base, in bf16 and in fp32, for each seed. Prints each run's fp32-evaluated
accuracy (the summary's main metric), mean and standard deviation per precision, and the
training images/s. Every run is a separate ``visionlora train`` process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402


def train(*args: str) -> dict:
    command = [sys.executable, "-m", "visionlora", "train", "--no-progress", "--overwrite", *args]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr[-2000:])
    output = args[args.index("--output") + 1]
    mode = args[args.index("--mode") + 1]
    results = "training_results_lora" if mode == "lora" else "training_results"
    return json.loads((Path(output) / results / "training_summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    from visionlora.examples.synthetic import make_classification_folder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_classification_folder(root / "pretrain", per_class_train=60, per_class_val=15, seed=100)
        make_classification_folder(root / "target", per_class_train=2, per_class_val=25, seed=200,
                                   classes=["red_disc", "green_disc", "blue_disc"])  # a new head to learn
        base = train("--data", str(root / "pretrain"), "--model", "tiny", "--mode", "full", "--epochs", "10",
                     "--lr", "1e-3", "--mixed-precision", "no", "--output", str(root / "base"))
        rows = []
        for precision in ("bf16", "no"):
            for seed in args.seeds.split(","):
                summary = train("--data", str(root / "target"), "--model", str(root / "base" / "trained_model"),
                                "--mode", "lora", "--epochs", str(args.epochs), "--lr", "3e-4", "--seed", seed,
                                "--mixed-precision", precision, "--output", str(root / f"lora-{precision}-{seed}"))
                rows.append({"precision": summary["mixed_precision"], "seed": seed,
                             "accuracy (fp32 eval)": summary["metrics"]["accuracy"],
                             "accuracy (training precision)": summary["metrics_in_training_precision"]["accuracy"],
                             "images/s": summary["time"]["train_images_per_second"]})
    print(f"pretrained base: full fine-tune on generated images, accuracy {base['metrics']['accuracy']:.3f}")
    print(table(rows, ["precision", "seed", "accuracy (fp32 eval)", "accuracy (training precision)", "images/s"]))
    for precision in ("bf16", "fp32"):
        values = [r["accuracy (fp32 eval)"] for r in rows if r["precision"] == precision]
        print(f"{precision}: accuracy {statistics.mean(values):.3f} "
              f"± {statistics.stdev(values) if len(values) > 1 else 0:.3f}")


if __name__ == "__main__":
    main()
