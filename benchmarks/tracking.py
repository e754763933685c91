"""Frames per second of ``predict VIDEO`` with and without ``--track``, and the identities each
gives, on the same videos in one run: 64x64 frames (the worst case for the tracker's share: a tiny
model on small frames) and 320x320 (closer to a real detector's cost per frame).

    python benchmarks/tracking.py                      # 600 frames at 64 and 320 px, 5 timed passes each
    python benchmarks/tracking.py --save-video         # the drawn video written too (IDs and trails drawn)
    python benchmarks/tracking.py --frames 200 --repeats 1 --sizes 64

A tiny RT-DETRv2 is fine-tuned for a few epochs on 64x64 frames of other moving-shape videos, so
that the tracker gets about as many boxes per frame as there are shapes (its cost grows with
the box count); the model sees 64 px whatever the frame size. Passes without tracking, with it,
and with ``--max-individuals`` (the shapes' count) alternate, after one untimed warm-up per size;
frames/s is each kind's median, "vs off" the median of each round's ratio of speeds (a round:
one pass of each kind), and the tracker's share of the tracked passes' time is the tracker's
own, which other load on the machine moves far less than the ratio. Each row's identities,
IDF1 and HOTA (motmetrics, trackeval) are scored against the video's true identities; without
tracking, boxes are named by their place in their frame.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHAPES = 4  # moving shapes in each video


def train_detector(work: Path, epochs: int) -> Path:
    """A tiny RT-DETRv2 from its pretrained twin, fine-tuned on generated moving-shape frames."""
    from visionlora.config import TrainConfig
    from visionlora.examples.tracking import write_tracking_frames
    from visionlora.tasks.detection.task import DetectionTask
    from visionlora.training.engine import train

    frames = write_tracking_frames(work / "frames", n_train=32, n_val=8, count=SHAPES)
    config = TrainConfig(task=DetectionTask.name, data=str(frames / "train"), val_data=str(frames / "val"),
                         model="tiny-rtdetr-pretrained", mode="full", epochs=epochs, batch_size=8, lr=5e-4,
                         augment=False, output=str(work / "detector"), progress=False, mixed_precision="no")
    return train(config.validate()).paths.root


def timed_pass(run, video: Path, threshold: float, settings, save_video: Path | None) -> dict[str, Any]:
    """Seconds of one pass over ``video`` (tracked with ``settings`` unless None), its frames, and
    the seconds spent in the tracker within that pass."""
    from visionlora.deploy.tracking import VideoTracker
    from visionlora.deploy.video import predict_video

    predict = run.predictor({"threshold": threshold})
    tracker = VideoTracker(settings, run.task.prediction.tracked) if settings is not None else None
    in_tracker = [0.0]
    if tracker is not None:
        follow = tracker.follow

        def timed_follow(prediction: dict) -> None:
            started = time.perf_counter()
            follow(prediction)
            in_tracker[0] += time.perf_counter() - started

        tracker.follow = timed_follow  # type: ignore[method-assign]
    started = time.perf_counter()
    answer = predict_video(video, predict, run.draw, progress=False, tracker=tracker, save_video=save_video)
    return {"seconds": time.perf_counter() - started, "answer": answer, "in_tracker": in_tracker[0],
            "tracker": tracker}


def scored(answer: dict[str, Any], truth_file: Path, run, tracked: bool) -> dict[str, Any]:
    """Identities, IDF1, identity switches and HOTA of one pass's boxes against the true tracks."""
    from visionlora.deploy.tracking import mot_lines
    from visionlora.metrics.tracking import hota, identity_scores, parse_mot, read_mot

    frames = answer["frames"]
    if tracked:
        found = parse_mot("\n".join(mot_lines(frames, run.task.prediction.tracked)))
    else:  # each box named by its place in its frame
        found = {f["frame"] + 1: [(place, [x0, y0, x1 - x0, y1 - y0])
                                  for place, (x0, y0, x1, y1) in enumerate((b["box"] for b in f["boxes"]), start=1)]
                 for f in frames}
    truth = read_mot(truth_file)
    identity, overall = identity_scores(truth, found), hota(truth, found)
    return {"identities": len({i for rows in found.values() for i, _ in rows}), "IDF1": round(identity["idf1"], 3),
            "switches": int(identity["num_switches"]), "HOTA": round(overall["hota"], 3)}


def measure(run, size: int, video: Path, truth_file: Path, threshold: float, repeats: int,
            save_video: Path | None) -> list[dict[str, Any]]:
    """Rows without tracking, with it, and with at most SHAPES identities: medians over ``repeats``
    alternating passes, scored on the first."""
    from visionlora.deploy.tracking import TrackSettings

    kinds = {"off": None, "bytetrack": TrackSettings().check(),
             f"bytetrack, max {SHAPES}": TrackSettings(max_individuals=SHAPES).check()}
    timed_pass(run, video, threshold, kinds["bytetrack"], save_video)  # warm-up: the model, the trackers import
    passes: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for _ in range(repeats):
        for kind, settings in kinds.items():
            passes[kind].append(timed_pass(run, video, threshold, settings, save_video))
    rows = []
    for kind, settings in kinds.items():
        first = passes[kind][0]
        paired = [off["seconds"] / tracked["seconds"] for off, tracked in zip(passes["off"], passes[kind])]
        frames = len(first["answer"]["frames"])
        median = statistics.median(p["seconds"] for p in passes[kind])
        rows.append({"size": f"{size}x{size}", "tracking": kind, "frames": frames,
                     "boxes/frame": round(sum(len(f["boxes"]) for f in first["answer"]["frames"]) / frames, 1),
                     "frames/s": round(frames / median, 1), "vs off": round(statistics.median(paired), 3),
                     "tracker ms/frame": round(statistics.median(p["in_tracker"] for p in passes[kind])
                                               / frames * 1000, 2),
                     "tracker share": f"{statistics.median(p['in_tracker'] / p['seconds'] for p in passes[kind]):.1%}",
                     **scored(first["answer"], truth_file, run, settings is not None)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 320],
                        help="frame widths and heights in pixels (default 64 320)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of each (default 5)")
    parser.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs of the detector (default 12)")
    parser.add_argument("--threshold", type=float, default=0.3, help="the detector's box threshold (default 0.3)")
    parser.add_argument("--save-video", action="store_true",
                        help="write each pass's drawn video too (boxes; tracked: IDs and trails), timing the drawing")
    args = parser.parse_args()
    import torch

    import visionlora
    from visionlora.examples.tracking import write_tracking_video

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        run = visionlora.load(train_detector(work, args.epochs))
        rows = []
        for size in args.sizes:
            video, truth = write_tracking_video(work / f"shapes-{size}.mp4", frames=args.frames, seed=100, size=size,
                                                count=SHAPES)
            rows += measure(run, size, video, truth, args.threshold, args.repeats,
                            work / "drawn.mp4" if args.save_video else None)
    drawn = "drawn video written" if args.save_video else "no drawn video"
    print(f"\n{args.frames} frames, {SHAPES} moving shapes, tiny RT-DETRv2 (sees 64 px), fp32, "
          f"{torch.get_num_threads()} CPU threads, batches of 16 frames, {drawn}, median of {args.repeats}")
    print(table(rows, ["size", "tracking", "frames", "boxes/frame", "frames/s", "vs off", "tracker ms/frame",
                       "tracker share", "identities", "IDF1", "switches", "HOTA"]))


if __name__ == "__main__":
    main()
