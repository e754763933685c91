"""Regenerate the ``*-pretrained`` built-in models: full training of each built-in tiny model on
a seeded procedural corpus (see ``visionlora.examples.procedural``), saved as package data.

    python scripts/pretrain_builtins.py                 # all twins (about an hour on 2 CPU cores)
    python scripts/pretrain_builtins.py --only classification
    python scripts/pretrain_builtins.py --quick         # a small corpus, to try the script

Each twin lands in ``src/visionlora/pretrained/<task>-<built-in>/`` as ``config.json``,
``model.safetensors`` and ``preprocessor_config.json``, with ``provenance.json`` recording the
corpus, epochs, seed, validation metrics and time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from visionlora.config import TrainConfig
from visionlora.examples import procedural
from visionlora.modeling.builtin import PRETRAINED_DIR
from visionlora.training.engine import train

# (corpus maker, corpus description, built-in, epochs, batch size, learning rate), per task.
PLANS = {
    "classification": dict(
        builtin="tiny", epochs=80, batch_size=128, lr=2e-3, per_item=(600, 30),
        describe=lambda n: f"{len(procedural.pretraining_classes())} classes (12 shapes x 3 textures), "
                           f"{n[0]} train / {n[1]} val images each, 40 px, shapes upright within 17 degrees",
        make=lambda root, n, seed: procedural.write_shape_folder(root, procedural.pretraining_classes(), *n, seed=seed),
    ),
    "detection": dict(
        builtin="tiny-rtdetr", epochs=40, batch_size=32, lr=5e-4, per_item=(8000, 400),
        describe=lambda n: f"{n[0]} train / {n[1]} val 64 px scenes of 1-5 objects of 12 shapes, COCO JSON",
        make=lambda root, n, seed: procedural.write_shape_scenes(root, procedural.PRETRAIN_SHAPES, *n, seed=seed),
    ),
    "pose": dict(
        builtin="tiny", epochs=40, batch_size=64, lr=1e-3, per_item=(8000, 400),
        describe=lambda n: f"{n[0]} train / {n[1]} val 64 px walkers with 11 keypoints, COCO keypoints",
        make=lambda root, n, seed: procedural.write_walkers(root, *n, seed=seed),
    ),
    "segmentation": dict(
        builtin="tiny", epochs=80, batch_size=32, lr=2e-3, per_item=(4000, 200),
        describe=lambda n: f"{n[0]} train / {n[1]} val 64 px scenes of 1-5 of 12 shapes, images+masks",
        make=lambda root, n, seed: procedural.write_shape_segmentation(root, procedural.PRETRAIN_SHAPES, *n,
                                                                       seed=seed),
    ),
}
KEPT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def pretrain(task: str, work: Path, quick: bool, seed: int) -> dict:
    """Generate the task's corpus, train its built-in in full, copy the weights into the package."""
    plan = PLANS[task]
    sizes = tuple(max(4, n // 20) for n in plan["per_item"]) if quick else plan["per_item"]
    epochs = 2 if quick else plan["epochs"]
    corpus = plan["make"](work / f"{task}-corpus", sizes, seed)
    started = time.time()
    result = train(TrainConfig(
        task=task, data=str(corpus), model=plan["builtin"], mode="full", epochs=epochs,
        batch_size=plan["batch_size"], lr=plan["lr"], augment=plan.get("augment", True), seed=seed,
        mixed_precision="no",  # fp32 is faster for tiny models
        output=str(work / f"{task}-run"), overwrite=True,
    ))
    folder = PRETRAINED_DIR / f"{task}-{plan['builtin']}"
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in KEPT_FILES:
        shutil.copy2(result.paths.model_dir / name, staging / name)
    provenance = {
        "task": task, "architecture": plan["builtin"], "corpus": plan["describe"](sizes), "seed": seed,
        "epochs": epochs, "batch_size": plan["batch_size"], "lr": plan["lr"], "augment": plan.get("augment", True),
        "quick": quick,
        "validation_metrics": result.summary["metrics"], "train_seconds": round(time.time() - started, 1),
        "made_by": "scripts/pretrain_builtins.py",
    }
    (staging / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    print(f"{task}: {folder} ({provenance['train_seconds']} s, {result.summary['main_metric']} "
          f"{result.summary['metrics'][result.summary['main_metric']]:.4f})")
    return provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(PLANS), action="append", help="pretrain only this task (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a 20x smaller corpus and 2 epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the corpora and runs (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work or temporary)
        for task in args.only or list(PLANS):
            pretrain(task, work, args.quick, args.seed)


if __name__ == "__main__":
    main()
