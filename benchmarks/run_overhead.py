"""One run's own overhead: where a short ``visionlora train`` spends its time outside its training steps.

    python benchmarks/run_overhead.py                    # ViT-B/16, 2 epochs, 48 train / 16 val images
    python benchmarks/run_overhead.py --repeat 2         # two runs, the quieter one (least time outside steps) shown
    python benchmarks/run_overhead.py --baseline SRC     # also the code in SRC (e.g. another checkout's src/)

Each run is a real ``visionlora train`` process (LoRA on a ViT-B/16 built from its config and
saved as a checkpoint, 224 px, generated four-class images). The time outside the steps is the
process's wall time less the run's ``time.train_seconds``; ``time.phases`` in the run's
``training_summary.json`` breaks it down, and the process's own start (interpreter, imports) and
end (summary, exit) are the wall time before the run's ``time.started_at`` and after its
``time.wall_seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402
from gpu_check import vit_base_folder  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def train_process(work: Path, name: str, src: Path, epochs: int) -> dict[str, Any]:
    """Run ``visionlora train`` with the code in ``src``; the run's summary, with the process's wall
    time and launch moment added."""
    output = work / "runs" / name
    command = [sys.executable, "-m", "visionlora", "train", "--task", "classification", "--data", str(work / "data"),
               "--model", str(work / "vit-base"), "--epochs", str(epochs), "--seed", "0", "--no-progress",
               "--output", str(output), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    launched = time.time()
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    ended = time.time()
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    summary = json.loads((output / "training_results_lora" / "training_summary.json").read_text())
    return {"summary": summary, "launched": launched, "process_seconds": ended - launched,
            "files": sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())}


def breakdown(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (part, seconds): the process's start, the run's phases, the process's end, the totals."""
    timing, total = result["summary"]["time"], result["process_seconds"]
    phases = timing.get("phases") or {}
    started_at = timing.get("started_at")
    rows = []
    if started_at is not None:
        rows.append({"part": "process start + imports", "seconds": started_at - result["launched"]})
    rows += [{"part": phase, "seconds": seconds} for phase, seconds in phases.items()]
    if started_at is not None:
        rows.append({"part": "summary writing + process exit",
                     "seconds": result["launched"] + total - started_at - timing["wall_seconds"]})
    steps = timing["train_seconds"]
    rows += [{"part": "= wall time (process)", "seconds": total},
             {"part": "  in training steps", "seconds": steps},
             {"part": "  outside training steps", "seconds": total - steps}]
    for row in rows:
        row["seconds"] = round(row["seconds"], 2)
    return rows


def outside_steps(result: dict[str, Any]) -> float:
    return result["process_seconds"] - result["summary"]["time"]["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class-train", type=int, default=12, help="training images per class (4 classes)")
    parser.add_argument("--per-class-val", type=int, default=4, help="validation images per class")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each code; the quieter one is shown")
    parser.add_argument("--baseline", type=Path, help="a src/ folder to compare with (run in turn with this one)")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(SRC))
    from visionlora.examples.synthetic import make_classification_folder

    with tempfile.TemporaryDirectory(prefix="run-overhead-") as folder:
        work = Path(folder)
        vit_base_folder(work / "vit-base")
        make_classification_folder(work / "data", per_class_train=args.per_class_train,
                                   per_class_val=args.per_class_val)
        codes = {"this": SRC, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
        results: dict[str, list[dict[str, Any]]] = {label: [] for label in codes}
        for attempt in range(args.repeat):  # the codes in turn, so that the machine's drift falls on both
            for label, src in codes.items():
                results[label].append(train_process(work, f"{label}{attempt}", src, args.epochs))
    report(results, args)


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    quietest = {label: min(runs, key=outside_steps) for label, runs in results.items()}
    for label, result in quietest.items():
        outside = [round(outside_steps(r), 2) for r in results[label]]
        print(f"\n{label} code ({4 * args.per_class_train} train / {4 * args.per_class_val} val images, "
              f"{args.epochs} epochs; outside steps in each run: {outside}; the quieter shown):")
        print(table(breakdown(result), ["part", "seconds"]))
        print("run folder files:", ", ".join(result["files"]))
    if "baseline" in quietest:
        this, base = outside_steps(quietest["this"]), outside_steps(quietest["baseline"])
        print(f"\noutside steps: {base:.2f} s -> {this:.2f} s ({base / this:.2f}x less); wall "
              f"{quietest['baseline']['process_seconds']:.2f} s -> {quietest['this']['process_seconds']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps({label: [{**r, "rows": breakdown(r)} for r in runs]
                                         for label, runs in results.items()}, indent=1))


if __name__ == "__main__":
    main()
