"""What to label next: training on the K images ``visionlora select`` picks against K random ones.

    python benchmarks/select_next.py                   # 3 seeds, K = 12
    python benchmarks/select_next.py --seeds 5 --count 18

Per seed, on generated shapes (the demo's 6 held-out classes, the ``tiny-pretrained`` base):
a start set of 2 labelled images per class trains the seed run (LoRA); an unlabelled pool holds
6 images per class and, as a video's burst of near-identical frames would, 20 near-copies (a
pixel's shift and a little noise) of 2 images in each of 2 classes: 80 of its 116 images are
copies of 4, so a pick can be wasted on a copy. The seed run selects K images from the pool; another K are
drawn at random. Each arm trains the same way on the start set plus its K images (labels from the
generator) and is measured once on a held-out test set of 15 images per class (accuracy, with the
best epoch's weights on a separate validation set of 4 per class).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from visionlora.config import TrainConfig  # noqa: E402
from visionlora.examples.procedural import TARGET_SHAPES, shape_image  # noqa: E402

CLASSES = [f"{shape}/solid" for shape in TARGET_SHAPES]
UNIQUE = 6  # pool images per class
REDUNDANT_CLASSES, SOURCES, COPIES = 2, 2, 20  # near-copies: of 2 images in each of 2 classes, 20 each
SETTINGS = dict(task="classification", model="tiny-pretrained", mode="lora", epochs=20, batch_size=8, lr=1e-3,
                progress=False, mixed_precision="no")


def _save(folder: Path, label: str, name: str, image) -> Path:
    path = folder / label.replace("/", "-") / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _near_copy(image, rng: np.random.Generator):
    from PIL import Image

    pixels = np.roll(np.asarray(image).astype(np.int16), tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
    pixels += rng.integers(-4, 5, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_pool(root: Path, seed: int) -> dict[Path, str]:
    """Write the start set, validation and test sets and the pool; return each pool image's class."""
    rng = np.random.default_rng(1000 + seed)
    for split, count in (("start", 2), ("val", 4), ("test", 15)):
        for label in CLASSES:
            for index in range(count):
                _save(root / split, label, f"{index:03d}.png", shape_image(label, rng))
    pool: dict[Path, str] = {}
    for number, label in enumerate(CLASSES):
        for index in range(UNIQUE):
            image = shape_image(label, rng)
            pool[_save(root / "pool", "", f"{label.split('/')[0]}_{index:02d}.png", image)] = label
            if number < REDUNDANT_CLASSES and index < SOURCES:  # a burst of near-identical frames
                for copy in range(COPIES):
                    name = f"{label.split('/')[0]}_{index:02d}_copy{copy:02d}.png"
                    pool[_save(root / "pool", "", name, _near_copy(image, rng))] = label
    return pool


def train_on(root: Path, name: str, picks: list[Path], pool: dict[Path, str], seed: int) -> dict:
    """Train on the start set plus ``picks``; the run's summary."""
    from visionlora.training.engine import train

    data = root / name
    shutil.copytree(root / "start", data / "train")
    for number, path in enumerate(picks):
        shutil.copyfile(path, data / "train" / pool[path].replace("/", "-") / f"picked_{number:03d}.png")
    for split in ("val", "test"):
        shutil.copytree(root / split, data / split)
    cfg = TrainConfig(data=str(data), output=str(root / f"{name}-run"), seed=seed, **SETTINGS)  # type: ignore[arg-type]
    return train(cfg).summary or {}


def one_seed(seed: int, count: int, workdir: Path) -> dict:
    from visionlora.deploy.predictor import load_run
    from visionlora.deploy.selection import select

    root = workdir / f"seed{seed}"
    pool = make_pool(root, seed)
    shutil.copytree(root / "start", root / "seed-data" / "train")
    shutil.copytree(root / "val", root / "seed-data" / "val")
    from visionlora.training.engine import train

    seed_run = train(TrainConfig(data=str(root / "seed-data"), output=str(root / "seed-run"), seed=seed,
                                 **SETTINGS))  # type: ignore[arg-type]
    files = sorted(pool)
    chosen, _, _ = select(load_run(seed_run.paths.root), files, count, root / "selected.txt")
    drawn = [files[i] for i in np.random.default_rng(seed).choice(len(files), size=count, replace=False)]
    arms = {name: train_on(root, name, picks, pool, seed) for name, picks in (("random", drawn),
                                                                              ("selected", chosen))}
    distinct = {name: len({p.name.split("_copy")[0].removesuffix(".png") for p in picks})
                for name, picks in (("random", drawn), ("selected", chosen))}
    return {"seed": seed, "seed_run": seed_run.summary["test_metrics"]["accuracy"] if seed_run.summary
            and seed_run.summary.get("test_metrics") else None,
            "random": arms["random"]["test_metrics"]["accuracy"], "selected": arms["selected"]["test_metrics"]
            ["accuracy"], "random_distinct": distinct["random"], "selected_distinct": distinct["selected"],
            "random_classes": len({pool[p] for p in drawn}), "selected_classes": len({pool[p] for p in chosen})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--count", type=int, default=12)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            rows.append(one_seed(seed, args.count, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    rows.append({"seed": "mean", "random": statistics.mean(r["random"] for r in rows),
                 "selected": statistics.mean(r["selected"] for r in rows),
                 "random_distinct": statistics.mean(r["random_distinct"] for r in rows),
                 "selected_distinct": statistics.mean(r["selected_distinct"] for r in rows)})
    copies = REDUNDANT_CLASSES * SOURCES * COPIES
    print(f"K = {args.count} of a pool of {UNIQUE * len(CLASSES) + copies} ({UNIQUE * len(CLASSES)} images + {copies} "
          "near-copies), start set 12, test set 90; "
          "test accuracy of the start set plus K; distinct: how many of the K are not copies of one another; "
          "classes: how many classes the K cover")
    print(table(rows, ["seed", "random", "selected", "random_distinct", "selected_distinct", "random_classes",
                       "selected_classes"]))


if __name__ == "__main__":
    main()
