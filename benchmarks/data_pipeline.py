"""Training throughput from real JPEG files vs from tensors already in memory.

    python benchmarks/data_pipeline.py [--data ../shared/datasets/hymenoptera] [--epochs 3] [--image-size 224]

The same tiny ViT and training loop run three times, each in its own process: on the
photos (decoded once, then augmented from memory every epoch); on ready-made tensors of
the same size and count (no augmentation); and on arrays already in memory with the same
augmentation. Prints training images/s of each and the ratios; the one-time decoding is
reported separately.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, run_isolated, table  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"


def worker(source: str, data: str, epochs: int, image_size: int) -> None:
    import torch

    from visionlora.artifacts import RunPaths
    from visionlora.config import TrainConfig
    from visionlora.runtime import new_accelerator
    from visionlora.tasks import get_task
    from visionlora.tasks.base import Datasets
    from visionlora.tasks.classification.task import AugmentedImages, CachedImages
    from visionlora.training.engine import TrainingLoop

    cfg = TrainConfig(task="classification", data=data, model="tiny", epochs=epochs, batch_size=16, lr=1e-3,
                      image_size=image_size, progress=False, save_every=0).validate()
    task = get_task("classification")
    torch.manual_seed(0)
    records = task.data.read_data(cfg)
    model, processor, info = task.model.build_model("tiny", records.labels, image_size, "full")
    started = time.perf_counter()
    datasets = task.data.make_datasets(records, processor, info, cfg)
    decode_seconds = time.perf_counter() - started
    if source != "files":
        count, val_count = len(datasets.train), len(datasets.val)
        labels = [i % len(records.labels) for i in range(count)]
        if source == "memory":  # ready-made normalised-on-access tensors, no augmentation
            pixels = [torch.randint(0, 256, (3, image_size, image_size), dtype=torch.uint8) for _ in range(count)]
            train = CachedImages(pixels, labels, datasets.val.normalizer)
        else:  # arrays already in memory, with the same augmentation as the files
            train = AugmentedImages([image.copy() for image in datasets.train.images], labels,
                                    datasets.val.normalizer, (image_size, image_size), cfg.seed)
        datasets = Datasets(train, datasets.val, {"train": count, "val": val_count}, [], {})
    accelerator = new_accelerator(mixed_precision="no")
    import tempfile

    loop = TrainingLoop(cfg, task, info, processor, accelerator, model, datasets,
                        RunPaths(Path(tempfile.mkdtemp()), "full"))
    loop.run()
    report({"source": source, "images": len(datasets.train), "train_seconds": loop.state.train_seconds,
            "images_per_second": loop.state.images_seen / loop.state.train_seconds, "decode_seconds": decode_seconds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.rest[0], args.rest[1], int(args.rest[2]), int(args.rest[3]))
        return
    if not Path(args.data).is_dir():
        sys.exit(f"{args.data}: no such folder (pass --data with an ImageFolder of photos)")
    sources = ("files", "memory", "memory+augment")
    results = {source: run_isolated(__file__, [source, args.data, str(args.epochs), str(args.image_size)])
               for source in sources}
    rows = [{"source": r["source"], "train images": r["images"], "images/s": r["images_per_second"],
             "train s": r["train_seconds"], "decode once s": r["decode_seconds"] if r["source"] == "files" else None}
            for r in results.values()]
    for baseline in sources[1:]:
        rows.append({"source": f"files/{baseline}",
                     "images/s": results["files"]["images_per_second"] / results[baseline]["images_per_second"]})
    print(f"tiny ViT at {args.image_size}px, batch 16, {args.epochs} epochs, data {args.data}")
    print(table(rows, ["source", "train images", "images/s", "train s", "decode once s"]))


if __name__ == "__main__":
    main()
