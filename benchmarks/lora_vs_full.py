"""LoRA against full fine-tuning and training from scratch, on the pretrained built-in models.

    python benchmarks/lora_vs_full.py --quick          # smoke subset: minutes
    python benchmarks/lora_vs_full.py                  # everything: a few CPU hours
    python benchmarks/lora_vs_full.py --only shapes --only sweep --sweep-on hymenoptera
    python benchmarks/lora_vs_full.py --combine OUT1 OUT2 --output OUT   # one report of parts

For each target, 3 training-set sizes x 3 seeds x {LoRA, full} on the ``*-pretrained`` twin
and full training of the random ``tiny`` ("scratch"); on the classification targets also
DoRA, LoHa, LoKr and OFT. Targets are kept out of the pretraining corpus: new shapes
(``procedural.TARGET_SHAPES``, solid), new object classes in scenes and in segmentation masks
(the same shapes), a new skeleton (the four-keypoint animal), and the real sets
in ``../shared/datasets`` when present. ``sweep`` measures LoRA rank, alpha and learning rate,
full fine-tuning's learning rate, and on detection which layers LoRA adapts, on the
``--sweep-on`` targets (default ``shapes``); ``--sweep-kind`` picks some of these.

Each run is its own process (its own peak memory). Prints tables and writes ``results.json``,
``table.md`` and ``metric_vs_images.png`` under ``--output``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, run_isolated, table  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
TARGET_STEPS = 300  # optimizer steps per run at least; small sets get more epochs
LEARNING_RATES = {"lora": 1e-3, "full": 2e-4, "scratch": 1e-3}
OTHER_METHODS = ("dora", "loha", "lokr", "oft")
SWEEP_SIZES = {"shapes": 20, "hymenoptera": 20, "scenes": 50, "animal": 50}  # training size swept at
SWEEP_KINDS = {"rank": ("lora_r", "lora_alpha", "lr"), "lr": ("lora_r", "lora_alpha", "lr"), "full-lr": ("lr",),
               "modules": ("target_modules",)}  # what each sweep varies -> its table's keys
RTDETR_ATTENTION_AND_FFN = ["q_proj", "k_proj", "v_proj", "o_proj", "value_proj", "output_proj", "fc1", "fc2"]
DETECTION_TARGET_SETS = {  # which layers LoRA adapts, from the preset's to every layer
    "q,v (preset)": ["q_proj", "v_proj"],
    "all attention + FFN": RTDETR_ATTENTION_AND_FFN,
    "+ backbone convs": [*RTDETR_ATTENTION_AND_FFN, "convolution"],
}


@dataclass(frozen=True)
class Target:
    task: str
    sizes: tuple[int | None, ...]  # None: all of it
    unit: str
    prepare: Callable[[Path, int | None, int], tuple[Path, Path]]  # (work, size, seed) -> (train, val)
    real: bool = False


# -- targets ---------------------------------------------------------------------------------
def _generated(kind: str):
    """A target generated once (seed 100, so never the pretraining corpus) whose training part is
    cut to ``size`` items (per class for classification); subsets nest."""
    def prepare(work: Path, size: int | None, seed: int) -> tuple[Path, Path]:
        from visionlora.examples import procedural, synthetic

        full = work / f"{kind}-full"
        if not full.exists():
            if kind == "shapes":
                solid = [f"{shape}/solid" for shape in procedural.TARGET_SHAPES]
                procedural.write_shape_folder(full, solid, 100, 40, seed=100)
            elif kind == "scenes":
                procedural.write_shape_scenes(full, procedural.TARGET_SHAPES, 200, 60, seed=100)
            elif kind == "regions":
                procedural.write_shape_segmentation(full, procedural.TARGET_SHAPES, 200, 60, seed=100)
            else:
                synthetic.make_pose_dataset(full, "coco", n_train=200, n_val=60, seed=100)
        subset = work / f"{kind}-{size}-{seed}"
        if kind == "shapes":
            _subset_class_folders(full / "train", subset, size, seed)
        elif kind == "regions":
            _subset_mask_folders(full, subset, size, seed)
        else:
            _subset_coco(full / "train", subset, size, seed)
        return subset, full / "val"
    return prepare


def _subset_class_folders(source: Path, target: Path, per_class: int | None, seed: int) -> None:
    import random

    shutil.rmtree(target, ignore_errors=True)
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        random.Random(seed).shuffle(files)
        (target / folder.name).mkdir(parents=True)
        for file in files[:per_class]:
            _place(file, target / folder.name / file.name)


def _subset_mask_folders(full: Path, target: Path, count: int | None, seed: int) -> None:
    """``count`` training images with their masks, and the class list."""
    import random

    shutil.rmtree(target, ignore_errors=True)
    images = sorted((full / "train" / "images").iterdir())
    random.Random(seed).shuffle(images)
    for folder in ("images", "masks"):
        (target / folder).mkdir(parents=True)
    for image in images[:count]:
        _place(image, target / "images" / image.name)
        _place(full / "train" / "masks" / image.name, target / "masks" / image.name)
    _place(full / "classes.txt", target / "classes.txt")


def _place(source: Path, target: Path) -> None:
    """A hard link to ``source`` (a copy across file systems): readers refuse links leading
    outside a dataset folder, and subsets must not copy what they need not."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _subset_coco(source: Path, target: Path, count: int | None, seed: int) -> None:
    import random

    data = json.loads((source / "annotations.json").read_text())
    images = list(data["images"])
    random.Random(seed).shuffle(images)
    kept = images[:count]
    ids = {image["id"] for image in kept}
    shutil.rmtree(target, ignore_errors=True)
    (target / "images").mkdir(parents=True)
    for image in kept:
        _place(source / "images" / image["file_name"], target / "images" / image["file_name"])
    subset = {**data, "images": kept, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    (target / "annotations.json").write_text(json.dumps(subset))


def _hymenoptera(work: Path, size: int | None, seed: int) -> tuple[Path, Path]:
    subset = work / f"hymenoptera-{size}-{seed}"
    _subset_class_folders(SHARED / "hymenoptera" / "train", subset, size, seed)
    return subset, SHARED / "hymenoptera" / "val"


def _raccoon(work: Path, size: int | None, seed: int) -> tuple[Path, Path]:
    """The dataset's own 160/40 split (``data/test_labels.csv``); training cut to ``size``."""
    import csv
    import random

    root = SHARED / "raccoon"
    test = {row["filename"] for row in csv.DictReader((root / "data" / "test_labels.csv").open())}
    images = sorted(p.name for p in (root / "images").iterdir())
    train = [name for name in images if name not in test]
    random.Random(seed).shuffle(train)
    parts = {work / f"raccoon-{size}-{seed}": train[:size], work / "raccoon-val": sorted(test)}
    for folder, names in parts.items():
        shutil.rmtree(folder, ignore_errors=True)
        for sub in ("images", "annotations"):
            (folder / sub).mkdir(parents=True)
        for name in names:
            _place(root / "images" / name, folder / "images" / name)
            xml = root / "annotations" / (Path(name).stem + ".xml")
            _place(xml, folder / "annotations" / xml.name)
    return tuple(parts)


def _openfield(work: Path, size: int | None, seed: int) -> tuple[Path, Path]:
    """The first 80% of the labelled frames train (cut to ``size``), the rest validate."""
    import random

    root = SHARED / "dlc-openfield"
    csv_file = next((root / "labeled-data").glob("*/CollectedData_*.csv"))
    lines = csv_file.read_text().splitlines()
    header, rows = lines[:3], lines[3:]
    cut = int(len(rows) * 0.8)
    train = rows[:cut]
    random.Random(seed).shuffle(train)
    parts = {work / f"openfield-{size}-{seed}": train[:size], work / "openfield-val": rows[cut:]}
    for folder, kept in parts.items():
        shutil.rmtree(folder, ignore_errors=True)
        frames = folder / csv_file.parent.relative_to(root)
        frames.mkdir(parents=True)
        shutil.copy(root / "config.yaml", folder / "config.yaml")
        (frames / csv_file.name).write_text("\n".join(header + kept) + "\n")
        for row in kept:
            relative = row.split(",", 1)[0]
            _place(root / relative, folder / relative)
    return tuple(parts)


TARGETS = {
    "shapes": Target("classification", (5, 20, 100), "images per class", _generated("shapes")),
    "scenes": Target("detection", (10, 50, 200), "images", _generated("scenes")),
    "animal": Target("pose", (10, 50, 200), "images", _generated("animal")),
    "regions": Target("segmentation", (10, 50, 200), "images", _generated("regions")),
    "hymenoptera": Target("classification", (5, 20, None), "images per class", _hymenoptera, real=True),
    "raccoon": Target("detection", (10, 50, None), "images", _raccoon, real=True),
    "openfield": Target("pose", (10, 50, None), "frames", _openfield, real=True),
}
TWINS = {"classification": "tiny-pretrained", "detection": "tiny-rtdetr-pretrained", "pose": "tiny-pretrained",
         "segmentation": "tiny-pretrained"}
SCRATCH = {"classification": "tiny", "detection": "tiny-rtdetr", "pose": "tiny", "segmentation": "tiny"}


# -- one run (worker process) ----------------------------------------------------------------
def worker(args: list[str]) -> None:
    """Train one configuration and report its figures."""
    import visionlora
    from visionlora.config import TrainConfig
    from visionlora.training.engine import train

    spec = json.loads(args[0])
    train_data, val_data = Path(spec["train"]), Path(spec["val"])
    result = train(TrainConfig(**spec["config"], data=str(train_data), val_data=str(val_data),
                               output=spec["output"], overwrite=True, progress=False))
    summary = result.summary
    main_metric = summary["main_metric"]
    figures = {
        "metric": summary["metrics"][main_metric],
        "main_metric": main_metric,
        "trainable_percent": summary["parameters"]["trainable_percent"],
        "saved_bytes": summary["sizes"]["saved_model_bytes"],
        "steps": summary["training"]["optimizer_steps"],
        "seconds_per_step": summary["time"]["train_seconds"] / max(summary["training"]["optimizer_steps"], 1),
        "train_images": summary["data"]["counts"]["train"],
    }
    if spec.get("train_metric"):
        figures["train_metric"] = visionlora.load(result.paths.root).evaluate(str(train_data))["metrics"][main_metric]
    shutil.rmtree(result.paths.root, ignore_errors=True)
    report(figures)


def run_one(work: Path, target_name: str, size: int | None, seed: int, arm: str, extra: dict | None = None) -> dict:
    target = TARGETS[target_name]
    train_data, val_data = target.prepare(work / "data", size, seed)
    method = arm if arm in OTHER_METHODS else "lora"
    mode = "lora" if arm in ("lora", *OTHER_METHODS) else "full"
    config = {"task": target.task, "mode": mode, "method": method, "seed": seed, "batch_size": 16,
              "model": SCRATCH[target.task] if arm == "scratch" else TWINS[target.task],
              "lr": LEARNING_RATES.get(arm, LEARNING_RATES["lora"]), "mixed_precision": "no"}
    config.update(extra or {})
    items = _count_items(train_data, target.task)
    steps_per_epoch = max(1, math.ceil(items / config["batch_size"]))
    config["epochs"] = min(150, max(15, math.ceil(TARGET_STEPS / steps_per_epoch)))
    spec = {"train": str(train_data), "val": str(val_data), "config": config,
            "output": str(work / "runs" / f"{target_name}-{size}-{seed}-{arm}"), "train_metric": True}
    row = run_isolated(__file__, [json.dumps(spec)], timeout=3600)
    row.update(target=target_name, task=target.task, size=size if size is not None else "all", seed=seed, arm=arm,
               **(extra or {}))
    print(f"  {target_name} size={row['size']} seed={seed} {arm} {extra or ''}: {row['main_metric']} "
          f"{row['metric']:.4f} ({row['steps']} steps)", flush=True)
    return row


def _count_items(train_data: Path, task: str) -> int:
    if task == "classification":
        return sum(1 for p in train_data.rglob("*") if p.is_file() or p.is_symlink())
    if (train_data / "annotations.json").exists():
        return len(json.loads((train_data / "annotations.json").read_text())["images"])
    if (train_data / "images").is_dir() and (train_data / "masks").is_dir():
        return len(list((train_data / "images").iterdir()))
    if (train_data / "annotations").exists():
        return len(list((train_data / "annotations").iterdir()))
    return len(next(train_data.glob("labeled-data/*/CollectedData_*.csv")).read_text().splitlines()) - 3


# -- the benchmark ---------------------------------------------------------------------------
def aggregate(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Mean and sd over seeds of each (keys) group."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        values = [m["metric"] for m in members]
        line = dict(zip(keys, key))
        line["metric"] = f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"
        line["main_metric"] = members[0]["main_metric"]
        if "train_metric" in members[0]:
            gaps = [_gap(m) for m in members]
            line["train-val gap"] = f"{statistics.mean(gaps):+.3f}"
        line["trainable %"] = members[0]["trainable_percent"]
        line["saved KB"] = round(members[0]["saved_bytes"] / 1024)
        line["s/step"] = round(statistics.mean(m["seconds_per_step"] for m in members), 4)
        line["peak MB"] = round(max(m["peak_rss_mb"] for m in members))
        line["seeds"] = len(members)
        out.append(line)
    return out


def _higher_is_better(task: str) -> bool:
    from visionlora.tasks import get_task

    return get_task(task).greater_is_better


def _gap(row: dict) -> float:
    """How much better the training set scores than validation (positive: it fits its
    training images better than it generalises), whichever way the metric points."""
    difference = row["train_metric"] - row["metric"]
    return difference if _higher_is_better(row["task"]) else -difference


def plot(rows: list[dict], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows if r.get("arm") in ("lora", "full", "scratch") and "sweep" not in r})
    columns = min(3, max(1, len(targets)))
    rows_of_plots = max(1, math.ceil(len(targets) / columns))
    fig, axes = plt.subplots(rows_of_plots, columns, figsize=(4.2 * columns, 3.4 * rows_of_plots), squeeze=False)
    for axis in axes.flat[len(targets):]:
        axis.set_visible(False)
    for axis, target in zip(axes.flat, targets):
        sizes = set()
        for arm in ("lora", "full", "scratch", *OTHER_METHODS):
            points: dict[int, list[float]] = {}
            for r in rows:
                if r["target"] == target and r["arm"] == arm and "sweep" not in r:
                    points.setdefault(r["train_images"], []).append(r["metric"])
            if points:
                xs = sorted(points)
                sizes.update(xs)
                axis.errorbar(xs, [statistics.mean(points[x]) for x in xs],
                              yerr=[statistics.pstdev(points[x]) for x in xs], marker="o", capsize=3, label=arm)
        row = next(r for r in rows if r["target"] == target)
        better = "higher" if _higher_is_better(row["task"]) else "lower"
        axis.set(xscale="log", xlabel="training images", title=target,
                 ylabel=f"{row['main_metric'].replace('_', ' ')} ({better} is better)")
        axis.set_xticks(sorted(sizes), [str(size) for size in sorted(sizes)])
        axis.minorticks_off()
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=150)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=argparse.REMAINDER)
    parser.add_argument("--quick", action="store_true", help="one small size, one seed, LoRA/full/scratch")
    parser.add_argument("--only", action="append", choices=[*TARGETS, "sweep"], help="this target only (repeatable)")
    parser.add_argument("--sweep-on", action="append", choices=list(SWEEP_SIZES),
                        help="targets of the sweep (repeatable; default shapes)")
    parser.add_argument("--sweep-kind", action="append", choices=list(SWEEP_KINDS),
                        help="what the sweep varies (repeatable; default all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--combine", nargs="+", metavar="DIR", help="report the results.json of earlier outputs as one")
    parser.add_argument("--output", default="runs/bench-lora-vs-full")
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.combine:
        return write_reports([row for part in args.combine
                              for row in json.loads((Path(part) / "results.json").read_text())], output)
    seeds = [0] if args.quick else list(range(args.seeds))
    chosen = args.only or [*TARGETS, "sweep"]
    rows: list[dict] = []
    for name in [n for n in chosen if n in TARGETS]:
        target = TARGETS[name]
        if target.real and not SHARED.exists():
            print(f"{name}: skipped ({SHARED} is not here)")
            continue
        sizes = target.sizes[:1] if args.quick else target.sizes
        arms = ["lora", "full", "scratch"] + (list(OTHER_METHODS) if target.task == "classification" and not args.quick
                                              else [])
        for size in sizes:
            for seed in seeds:
                for arm in arms:
                    rows.append(run_one(output, name, size, seed, arm))
    if "sweep" in chosen:
        for name in args.sweep_on or ["shapes"]:
            if TARGETS[name].real and not SHARED.exists():
                print(f"sweep on {name}: skipped ({SHARED} is not here)")
                continue
            rows += sweep(output, name, seeds, args.quick, args.sweep_kind or list(SWEEP_KINDS))
    write_reports(rows, output)


def sweep(output: Path, target: str, seeds: list[int], quick: bool, kinds: list[str]) -> list[dict]:
    """On one target at its ``SWEEP_SIZES`` training size: LoRA rank x alpha (lr 5e-4), LoRA
    learning rate (r 16, alpha 32), full fine-tuning's learning rate, and on detection which
    layers LoRA adapts."""
    size, rows = SWEEP_SIZES[target], []

    def measure(kind: str, arm: str, extra: dict, label: dict | None = None) -> None:
        for seed in seeds:
            rows.append({**run_one(output, target, size, seed, arm, extra), **(label or {}), "sweep": kind})

    if "rank" in kinds:
        for r in (4, 16) if quick else (4, 8, 16, 32):
            for alpha in (r, 2 * r):
                measure("rank", "lora", {"lora_r": r, "lora_alpha": alpha, "lr": 5e-4})
    if "lr" in kinds:
        for lr in (1e-4, 1e-3) if quick else (1e-4, 2e-4, 5e-4, 1e-3):
            measure("lr", "lora", {"lora_r": 16, "lora_alpha": 32, "lr": lr})
    if "full-lr" in kinds:
        for lr in (2e-4, 1e-3) if quick else (2e-4, 5e-4, 1e-3):
            measure("full-lr", "full", {"lr": lr})
    if "modules" in kinds and TARGETS[target].task == "detection":
        for label, modules in DETECTION_TARGET_SETS.items():
            measure("modules", "lora", {"target_modules": modules}, {"target_modules": label})
    return rows


def side_by_side(rows: list[dict], keys: tuple[str, ...], across: str) -> tuple[list[dict], list[str]]:
    """One line per ``keys`` value, a column of mean ± sd per ``across`` value (with the metric
    named in the line, or in the column where it differs across them)."""
    metrics_of_line: dict[tuple, set[str]] = {}
    for r in rows:
        metrics_of_line.setdefault(tuple(r[k] for k in keys), set()).add(r["main_metric"])
    one_metric = all(len(names) == 1 for names in metrics_of_line.values())
    labels = {r[across]: r[across] if one_metric else f"{r[across]} {r['main_metric']}" for r in rows}
    lines: dict[tuple, dict] = {}
    for line in aggregate(rows, (*keys, across)):
        merged = lines.setdefault(tuple(line[k] for k in keys), {k: line[k] for k in keys})
        merged["metric"] = line["main_metric"]
        merged[labels[line[across]]] = line["metric"]
    order = [a for a in ("lora", "full", "scratch", *OTHER_METHODS) if a in labels] if across == "arm" else list(labels)
    return list(lines.values()), [*keys, *(["metric"] if one_metric else []), *(labels[a] for a in order)]


def write_reports(rows: list[dict], output: Path) -> None:
    main_rows = [r for r in rows if "sweep" not in r]
    columns = ["target", "size", "arm", "main_metric", "metric", "train-val gap", "trainable %", "saved KB", "s/step",
               "peak MB", "seeds"]
    text = []
    if main_rows:
        text.append("LoRA, full and scratch side by side (main metric, mean ± sd over seeds)")
        text.append(table(*side_by_side(main_rows, ("target", "size"), "arm")))
        text.append(table(aggregate(main_rows, ("target", "size", "arm")), columns))
    for kind, varied in SWEEP_KINDS.items():
        keys = ("target", "size", *varied)
        chosen = [r for r in rows if r.get("sweep") == kind]
        if chosen:
            text.append(f"Sweep ({kind}); each target at the training size after its name")
            sized = [{**r, "target": f"{r['target']}@{r['size']}"} for r in chosen]
            text.append(table(*side_by_side(sized, keys[2:], "target")))
            text.append(table(aggregate(chosen, keys), [*keys, "main_metric", "metric", "train-val gap",
                                                         "trainable %", "saved KB", "seeds"]))
    print("\n\n".join(text))
    (output / "results.json").write_text(json.dumps(rows, indent=1))
    (output / "table.md").write_text("\n\n".join(text) + "\n")
    if main_rows:
        plot(main_rows, output / "metric_vs_images.png")
    print(f"\nwrote {output}/results.json, table.md, metric_vs_images.png")


if __name__ == "__main__":
    main()
