"""The training input pipeline without a model: images/s per core that each task's training
dataset and collate deliver through a plain DataLoader, at its default base's input size.

    python benchmarks/input_pipeline.py [--before REV] [--epochs 3] [--batch-size 32] [--tasks classification ...]

Each task reads its real dataset from ../shared/datasets where it is there (hymenoptera,
raccoon, dlc-openfield), or generated images of photo size otherwise (segmentation, and every
task on a clone without that folder). Images are decoded once into RAM first (as ``--cache
ram`` does) and that time is not counted: the figures are the per-epoch augmentation and
collate that a GPU waits for, with ``--num-workers`` 0 and 2, in the steady state: a set smaller
than 1,024 items is repeated to that many per epoch. (Each epoch's start waits for the workers'
first batches; on a few hundred images that costs a share of the epoch these figures leave out.)
Batches carry uint8 pixels; the normalisation runs on the model's device, outside these figures.

``--before REV`` measures the same with the code of git revision REV too (checked out into a
temporary worktree and imported from there), and prints the two side by side.

Input sizes: classification 224 (ViT-B/16), detection 640 (RT-DETRv2), pose 256x192
(ViTPose-B), segmentation 512 (SegFormer).

What a GPU consumes, for scale: a ViT-B/16 LoRA step at 224 px costs about 35 GFLOP per image
(forward 17.6 GFLOP, plus the gradients of the activations, about as much again; no weight
gradients but the adapters'). At 40% of an H200's 989 dense bf16 TFLOP/s that is about 11,000
images/s to feed.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_device, report, run_isolated, synchronize, table  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
REAL = {"classification": SHARED / "hymenoptera", "detection": SHARED / "raccoon", "pose": SHARED / "dlc-openfield"}
# (builtin model whose processor and task settings are used, input size)
MODELS = {"classification": ("tiny", 224), "detection": ("tiny-rtdetr", 640), "pose": ("tiny", 256),
          "segmentation": ("tiny", 512)}
GPU_IMAGES_PER_S = 0.4 * 989e12 / 35e9
MIN_EPOCH_ITEMS = 1024  # small sets are repeated to this many items per epoch


def generated(task: str, root: Path) -> Path:
    """Photo-size generated data for ``task`` (when the real set is not there)."""
    from visionlora.examples.segmentation import make_segmentation_dataset
    from visionlora.examples.synthetic import make_classification_folder, make_detection_dataset, make_pose_dataset

    if task == "classification":
        return make_classification_folder(root, per_class_train=60, per_class_val=4)
    if task == "detection":
        return make_detection_dataset(root, n_train=160, n_val=4)
    if task == "pose":
        return make_pose_dataset(root, n_train=120, n_val=4)
    return make_segmentation_dataset(root, n_train=120, n_val=4, size=512)


class Repeated:
    """``dataset`` ``times`` over, one epoch: the steady state that epoch starts do not interrupt."""

    def __init__(self, dataset, times: int):
        self.dataset, self.times = dataset, times

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def worker(task_name: str, workers: int, epochs: int, batch_size: int) -> None:
    import torch
    from torch.utils.data import DataLoader

    from visionlora.config import TrainConfig
    from visionlora.data.cache import plan_cache
    from visionlora.tasks import get_task

    torch.set_num_threads(1)  # per core: the main process does the work with 0 workers
    task = get_task(task_name)
    model, size = MODELS[task_name]
    with tempfile.TemporaryDirectory() as tmp:
        data = REAL.get(task_name)
        source_name = data.name if data is not None and data.is_dir() else "generated"
        if source_name == "generated":
            data = generated(task_name, Path(tmp) / "data")
        cfg = TrainConfig(task=task_name, data=str(data), model=model, image_size=size, epochs=epochs,
                          progress=False).validate()
        source = task.data.read_data(cfg)
        _, processor, info = task.model.build_model(model, source.labels, size, "lora")
        plan = plan_cache("ram", None, len(source.train), task.data.image_bytes(processor, info))
        dataset, _ = task.data.train_dataset(source, processor, info, cfg, plan)
        dataset = Repeated(dataset, math.ceil(MIN_EPOCH_ITEMS / len(dataset)))
        try:  # training's own loader: workers hand batches over in reused shared memory
            from visionlora.training.loading import plan_loading

            device = torch.device(bench_device())  # on CUDA: pinned memory and non-blocking copies, as training
            plan = plan_loading(workers, device)
            loader = plan.loader(dataset, task.steps.collate, batch_size=batch_size, shuffle=True)
        except ImportError:  # a revision from before it
            device = torch.device("cpu")
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=task.steps.collate,
                                num_workers=workers, persistent_workers=workers > 0)
        for _ in loader:  # one warm-up epoch: workers started, pages touched
            break
        images, started = 0, time.perf_counter()
        for epoch in range(epochs):
            dataset.set_epoch(epoch)
            for batch in loader:
                images += len(batch["pixel_values"].to(device, non_blocking=True))
        synchronize()
        seconds = time.perf_counter() - started
    cores = max(1, min(workers, os.cpu_count() or 1))  # the workers' cores, or the main process's one
    report({"task": task_name, "data": source_name, "input": _input_size(processor, info), "workers": workers,
            "images": images, "images/s": images / seconds, "images/s per core": images / seconds / cores})


def _input_size(processor, info) -> str:
    """The model input as HxW: the pose crop, or the processor's resize."""
    input_size = getattr(info.state, "input_size", None)
    if input_size:
        width, height = input_size
        return f"{height}x{width}"
    size = processor.size
    return f"{size['height']}x{size['width']}" if "height" in size else str(dict(size))


@contextmanager
def checkout(revision: str):
    """The ``src`` folder of ``revision`` in a temporary git worktree, removed afterwards."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="vl-before-") as folder:
        tree = Path(folder) / "tree"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tree), revision], check=True,
                       capture_output=True)
        try:
            yield tree / "src"
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], capture_output=True)


def measure(tasks: list[str], epochs: int, batch_size: int, src: Path | None = None) -> list[dict]:
    """One row per task and worker count, with the code in ``src`` (default: this tree's)."""
    env = {"PYTHONPATH": str(src)} if src else None
    rows = []
    for task in tasks:
        single = None
        for workers in (0, 2):
            row = run_isolated(__file__, [task, str(workers), str(epochs), str(batch_size)], env=env)
            single = single or row["images/s"]
            rows.append({**row, "vs 0 workers": row["images/s"] / single})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=4, metavar=("TASK", "WORKERS", "EPOCHS", "BATCH"))
    parser.add_argument("--before", metavar="REV", help="also measure git revision REV, side by side")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tasks", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    if args.worker:
        task, workers, epochs, batch = args.worker
        return worker(task, int(workers), int(epochs), int(batch))
    rows = measure(args.tasks, args.epochs, args.batch_size)
    columns = ["task", "data", "input", "workers", "images", "images/s", "images/s per core", "vs 0 workers"]
    if args.before:
        with checkout(args.before) as src:
            before = measure(args.tasks, args.epochs, args.batch_size, src)
        for row, old in zip(rows, before):
            row["before per core"] = old["images/s per core"]
            row["after/before"] = row["images/s"] / old["images/s"]
        columns[6:6] = ["before per core"]
        columns.append("after/before")
    print(f"training input pipeline, no model: batch {args.batch_size}, {args.epochs} epochs, images in RAM, "
          f"{os.cpu_count()} cores" + (f"; before = {args.before}" if args.before else ""))
    print(table(rows, columns))
    print(f"\nfor scale: ViT-B/16 LoRA at 224 px on an H200 at 40% of its dense bf16 peak consumes about "
          f"{GPU_IMAGES_PER_S:,.0f} images/s (35 GFLOP per image)")


if __name__ == "__main__":
    main()
