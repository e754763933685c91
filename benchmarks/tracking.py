"""Frames per second of ``predict VIDEO`` with and without ``--track``, on the same video in one run.

    python benchmarks/tracking.py                   # 600 frames of moving shapes, 3 timed passes each
    python benchmarks/tracking.py --frames 200 --repeats 1
    python benchmarks/tracking.py --size 256        # larger frames (the model still sees 64 px)

A tiny RT-DETRv2 is fine-tuned for a few epochs on frames of other moving-shape videos, so that
the tracker gets about as many boxes per frame as there are shapes (the tracker's cost grows
with the box count). Passes with and without tracking alternate, after one untimed warm-up;
the median of each is reported, their ratio, and the share of the tracked passes' time spent
in the tracker itself, which other load on the machine moves far less than the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train_detector(work: Path, epochs: int) -> Path:
    """A tiny RT-DETRv2 from its pretrained twin, fine-tuned on generated moving-shape frames."""
    from visionlora.config import TrainConfig
    from visionlora.examples.tracking import write_tracking_frames
    from visionlora.tasks.detection.task import DetectionTask
    from visionlora.training.engine import train

    frames = write_tracking_frames(work / "frames", n_train=32, n_val=8)
    config = TrainConfig(task=DetectionTask.name, data=str(frames / "train"), val_data=str(frames / "val"),
                         model="tiny-rtdetr-pretrained", mode="full", epochs=epochs, batch_size=8, lr=5e-4,
                         augment=False, output=str(work / "detector"), progress=False, mixed_precision="no")
    return train(config.validate()).paths.root


def timed_pass(run, video: Path, threshold: float, track: bool) -> dict[str, float]:
    """Seconds, frames and boxes per frame of one pass over ``video``; tracked, also the seconds
    spent in the tracker within that pass (a share that other load on the machine hardly moves)."""
    from visionlora.deploy.tracking import TrackSettings, VideoTracker
    from visionlora.deploy.video import predict_video

    predict = run.predictor({"threshold": threshold})
    tracker = VideoTracker(TrackSettings(), run.task.prediction.tracked) if track else None
    in_tracker = [0.0]
    if tracker is not None:
        follow = tracker.follow

        def timed_follow(prediction: dict) -> None:
            started = time.perf_counter()
            follow(prediction)
            in_tracker[0] += time.perf_counter() - started

        tracker.follow = timed_follow  # type: ignore[method-assign]
    started = time.perf_counter()
    answer = predict_video(video, predict, run.draw, progress=False, tracker=tracker)
    seconds = time.perf_counter() - started
    frames = answer["frames"]
    return {"seconds": seconds, "frames": len(frames), "boxes": sum(len(f["boxes"]) for f in frames) / len(frames),
            "in_tracker": in_tracker[0]}


def measure(detector: Path, video: Path, threshold: float, repeats: int) -> list[dict]:
    """One row each without and with tracking: medians over ``repeats`` alternating passes."""
    import visionlora

    run = visionlora.load(detector)
    timed_pass(run, video, threshold, track=True)  # warm-up: the model, the trackers import
    passes: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(repeats):
        for track in (False, True):
            passes[track].append(timed_pass(run, video, threshold, track))
    rows = []
    for track in (False, True):
        median = statistics.median(p["seconds"] for p in passes[track])
        share = statistics.median(p["in_tracker"] / p["seconds"] for p in passes[track])
        first = passes[track][0]
        rows.append({"tracking": "bytetrack" if track else "off", "frames": first["frames"],
                     "boxes/frame": round(first["boxes"], 1), "seconds": round(median, 2),
                     "frames/s": round(first["frames"] / median, 1),
                     "tracker ms/frame": round(statistics.median(p["in_tracker"] for p in passes[track])
                                               / first["frames"] * 1000, 2),
                     "tracker share": f"{share:.1%}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--size", type=int, default=64, help="frame width and height in pixels (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each (default 3)")
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs of the detector (default 6)")
    parser.add_argument("--threshold", type=float, default=0.3, help="the detector's box threshold (default 0.3)")
    args = parser.parse_args()
    import torch

    from visionlora.examples.tracking import write_tracking_video

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        video, _ = write_tracking_video(work / "shapes.mp4", frames=args.frames, seed=100, size=args.size)
        rows = measure(train_detector(work, args.epochs), video, args.threshold, args.repeats)
    print(f"\n{args.frames} frames of {args.size}x{args.size}, 4 moving shapes, tiny RT-DETRv2, fp32, "
          f"{torch.get_num_threads()} CPU threads, batches of 16 frames, median of {args.repeats}")
    print(table(rows, ["tracking", "frames", "boxes/frame", "seconds", "frames/s", "tracker ms/frame",
                       "tracker share"]))
    ratio = rows[1]["frames/s"] / rows[0]["frames/s"]
    print(f"frames/s with --track / without: {ratio:.3f}; within the tracked passes, the tracker took "
          f"{rows[1]['tracker share']} of the time (passes on a loaded machine vary more than that)")


if __name__ == "__main__":
    main()
