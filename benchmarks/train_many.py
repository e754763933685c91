"""Many adapters: ``visionlora train-many`` against one ``visionlora train`` process per job, and
``visionlora tune`` against a sequential search of full trials; wall times from one run of this script.

    python benchmarks/train_many.py                       # 10 jobs, tiny-pretrained; and the tune comparison
    python benchmarks/train_many.py --model vit-base      # 10 jobs, a config-built ViT-B/16 (no tune)
    python benchmarks/train_many.py --skip-tune --jobs 4  # quicker

Every job has its own generated dataset (4 classes, the same size, another seed). Each side runs as
the user would run it, as processes of the ``visionlora`` command, with the same settings (auto
precision, seed 0). "step images/s" is the images trained per second of training steps (the runs'
summaries for the sequential side, the pack's own count for train-many).

The tune comparison draws the 16 settings ``tune`` would draw and trains each fully, one process
after another (what a grid or random search does; with ``--no-figures``, as a search reads only
their metrics), then runs ``tune --trials 16``; the sequential
search's best validation metric and the spread of its trials are printed beside tune's, so "as good"
can be judged against the noise.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from visionlora.examples.synthetic import make_classification_folder  # noqa: E402

COMMAND = [sys.executable, "-m", "visionlora"]


def _run(args: list[str], cwd: Path) -> tuple[float, str]:
    """(wall seconds, stderr) of one ``visionlora`` command, which must succeed."""
    started = time.perf_counter()
    done = subprocess.run([*COMMAND, *args], capture_output=True, text=True, cwd=cwd, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(f"visionlora {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout + done.stderr


def _summary(run: Path) -> dict:
    return json.loads((run / "training_results_lora" / "training_summary.json").read_text())


def _step_rate(runs: list[Path]) -> float:
    """Images per second of training steps over the runs (from their summaries)."""
    images = sum(_summary(run)["time"]["train_images_per_second"] * _summary(run)["time"]["train_seconds"]
                 for run in runs)
    return images / sum(_summary(run)["time"]["train_seconds"] for run in runs)


def _model(name: str, work: Path) -> str:
    if name != "vit-base":
        return name
    from gpu_check import vit_base_folder

    return str(vit_base_folder(work / "vit-base"))


def compare_train_many(work: Path, model: str, jobs: int, epochs: int, per_class: int,
                       pack_rows: list[str]) -> list[dict]:
    each = work / "each"
    for index in range(jobs):
        make_classification_folder(each / f"job{index:02d}", per_class_train=per_class, per_class_val=4, seed=index)
    settings = ["--model", model, "--epochs", str(epochs), "--no-progress", "--seed", "0", "--save-every", "0"]
    sequential = 0.0
    for index in range(jobs):
        seconds, _ = _run(["train", "--data", str(each / f"job{index:02d}"), "--output",
                           str(work / "alone" / f"job{index:02d}"), *settings], work)
        sequential += seconds
    alone_runs = [work / "alone" / f"job{i:02d}" for i in range(jobs)]
    rows = [{"side": f"{jobs} x visionlora train", "wall_s": sequential, "step_images_per_s": _step_rate(alone_runs),
             "vs_sequential": 1.0}]
    for rows_per_step in pack_rows:
        flags = ["--pack-rows", rows_per_step]
        packed, log = _run(["train-many", "--data-each", str(each), "--output", str(work / f"packed{len(rows)}"),
                            *settings, *flags], work)
        rate = re.search(r"packed steps: \d+ in [\d.]+s, ([\d.]+) images/s", log)
        rows.append({"side": f"visionlora train-many --pack-rows {rows_per_step}",
                     "wall_s": packed, "step_images_per_s": float(rate.group(1)) if rate else None,
                     "vs_sequential": sequential / packed})
    return rows


def compare_tune(work: Path, model: str, trials: int, epochs: int, per_class: int) -> list[dict]:
    from visionlora.config import build_config
    from visionlora.training import tune

    data = make_classification_folder(work / "tune-data", per_class_train=per_class, per_class_val=8, seed=99)
    shared = ["--model", model, "--no-progress", "--seed", "0", "--save-every", "0"]
    base = build_config({}, {"data": str(data), "model": model, "epochs": epochs})
    drawn = tune.sample_trials(tune.default_space(base), trials, tune.preset_settings(base), base.seed)
    sequential, values = 0.0, []
    for trial in drawn:
        cfg = tune.trial_config(base, trial, epochs, work / "search" / trial.name)
        flags = ["--lora-r", str(cfg.lora_r), "--lora-alpha", str(cfg.lora_alpha), "--lr", str(cfg.lr),
                 "--target-modules", ",".join(cfg.target_modules or []), "--lora-dropout", str(cfg.lora_dropout),
                 "--method", cfg.method, "--test-data", "none", "--no-figures"]  # a search reads metrics only
        seconds, _ = _run(["train", "--data", str(data), "--output", str(cfg.output), "--epochs", str(epochs),
                           *flags, *shared], work)
        sequential += seconds
        values.append(_summary(Path(str(cfg.output)))["metrics"]["accuracy"])
    seconds, _ = _run(["tune", "--data", str(data), "--output", str(work / "tune"), "--trials", str(trials),
                       "--epochs", str(epochs), *shared], work)
    best = _summary(work / "tune" / "best")["metrics"]["accuracy"]
    return [
        {"side": f"{trials} full trials, one after another", "wall_s": sequential, "best_accuracy": max(values),
         "trials_mean": statistics.mean(values), "trials_stdev": statistics.pstdev(values), "vs_sequential": 1.0},
        {"side": f"tune --trials {trials} (successive halving, packed rungs)", "wall_s": seconds,
         "best_accuracy": best, "vs_sequential": sequential / seconds},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-pretrained", help="tiny-pretrained or vit-base")
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=None, help="training images per class and job "
                        "(default: 24 for tiny-pretrained, 8 for vit-base)")
    parser.add_argument("--skip-tune", action="store_true")
    parser.add_argument("--skip-many", action="store_true", help="only the tune comparison")
    parser.add_argument("--pack-rows", nargs="+", default=["auto"], metavar="N|auto",
                        help="train-many once with each --pack-rows (default: once, auto)")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--tune-epochs", type=int, default=9)
    args = parser.parse_args()
    per_class = args.per_class or (8 if args.model == "vit-base" else 24)
    with tempfile.TemporaryDirectory(prefix="vl-many-") as tmp:
        work = Path(tmp)
        model = _model(args.model, work)
        if not args.skip_many:
            rows = compare_train_many(work, model, args.jobs, args.epochs, per_class, args.pack_rows)
            print(f"{args.jobs} jobs, {args.model}, {args.epochs} epochs, {per_class * 4} training images each")
            print(table(rows, ["side", "wall_s", "step_images_per_s", "vs_sequential"]), flush=True)
        if not args.skip_tune and args.model != "vit-base":
            rows = compare_tune(work, model, args.trials, args.tune_epochs, per_class)
            print(f"\ntune: {args.trials} trials, up to {args.tune_epochs} epochs, {per_class * 4} training images")
            print(table(rows, ["side", "wall_s", "best_accuracy", "trials_mean", "trials_stdev", "vs_sequential"]))


if __name__ == "__main__":
    main()
