"""Frames per second of ``predict`` on a video: a tiny pose model and a config-built ViTPose-B,
each with the whole frame as the instance and with a tiny RT-DETRv2 detector in front.

    python benchmarks/video.py                # a 30 s, 640x480, 30 fps clip
    python benchmarks/video.py --seconds 5    # shorter

The weights are untrained (config-built): speed does not depend on them, except that the
detector's box count sets how many crops pose runs on; the "with detector" rows keep its two
highest-scoring boxes per frame (two animals). ViTPose-B predicts every 10th frame (its rate
per predicted frame is what is reported), to keep the run within minutes on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_clip(path: Path, seconds: float, fps: int = 30, size=(640, 480)) -> Path:
    """A moving animal on a textured background, written with OpenCV (mp4v)."""
    import cv2
    import numpy as np

    from visionlora.examples.synthetic import pose_scene

    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    scene, _ = pose_scene(rng, 240)
    background = rng.integers(60, 160, size=(size[1], size[0], 3), dtype=np.uint8)
    for index in range(int(seconds * fps)):
        frame = background.copy()
        x = int((index * 3) % (size[0] - 240))
        frame[120:360, x:x + 240] = np.asarray(scene)
        writer.write(frame)
    writer.release()
    return path


def make_runs(work: Path) -> dict[str, Path]:
    """A tiny pose run, a ViTPose-B run (config-built base) and a tiny RT-DETRv2 detection run: one step each."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessorPil

    from visionlora.config import TrainConfig
    from visionlora.examples.synthetic import make_detection_dataset, make_pose_dataset
    from visionlora.training.engine import train

    frames = make_pose_dataset(work / "pose-data", "coco", n_train=4, n_val=2)
    boxes = make_detection_dataset(work / "boxes-data", "coco", n_train=4, n_val=2)
    base = work / "vitpose-base"
    backbone = VitPoseBackboneConfig(out_indices=[12])  # ViTPose-B: 12 layers, 768 wide, 256x192 input
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=4)).save_pretrained(base)
    VitPoseImageProcessorPil().save_pretrained(base)
    common = dict(epochs=1, max_steps=1, batch_size=2, overwrite=True, progress=False)
    return {
        "tiny pose": train(TrainConfig(task="pose", data=str(frames), model="tiny", output=str(work / "tiny"),
                                       **common)).paths.root,
        "ViTPose-B": train(TrainConfig(task="pose", data=str(frames), model=str(base), output=str(work / "vitb"),
                                       **common)).paths.root,
        "detector": train(TrainConfig(task="detection", data=str(boxes), model="tiny-rtdetr", output=str(work / "det"),
                                      **common)).paths.root,
    }


def frames_per_second(run_dir: Path, clip: Path, detector: Path | None, every: int) -> dict:
    import visionlora
    from visionlora.deploy.predictor import box_finder
    from visionlora.deploy.video import predict_video

    run = visionlora.load(run_dir)
    boxes = {"detector": str(detector), "detector_threshold": 0.0, "max_instances": 2} if detector else {}
    predict = run.predictor({}, box_finder(run, boxes))
    predict_video(clip, predict, run.draw, end=0.5, progress=False)  # warm-up
    started = time.perf_counter()
    answer = predict_video(clip, predict, run.draw, every=every, progress=False)
    seconds = time.perf_counter() - started
    instances = sum(len(f["instances"]) for f in answer["frames"]) / len(answer["frames"])
    return {"every": every, "frames": len(answer["frames"]), "seconds": round(seconds, 1),
            "frames/s": round(len(answer["frames"]) / seconds, 2), "crops/frame": round(instances, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        clip = make_clip(work / "clip.mp4", args.seconds)
        runs = make_runs(work)
        rows = []
        for name, every in (("tiny pose", 1), ("ViTPose-B", 10)):
            for detector in (None, runs["detector"]):
                row = {"model": name, "detector": "tiny RT-DETRv2, top 2" if detector else "none (whole frame)"}
                row.update(frames_per_second(runs[name], clip, detector, every))
                rows.append(row)
                print(row, flush=True)
    print(f"\n{args.seconds:g} s of 640x480 at 30 fps, fp32, {torch.get_num_threads()} CPU threads, "
          "batches of 16 frames")
    print(table(rows, ["model", "detector", "every", "frames", "seconds", "frames/s", "crops/frame"]))


if __name__ == "__main__":
    main()
