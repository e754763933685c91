"""Memory and speed against dataset size, for each --cache mode.

    python benchmarks/data_scale.py [--sizes 1000,5000,20000] [--max-steps 30] [--modes ram,disk,none]

Generates N 640x480 JPEG scenes with boxes (COCO), then trains a tiny RT-DETRv2 at 640 px
for a fixed ``--max-steps`` in a fresh process per (size, mode), and reports peak RSS and
peak anonymous memory (RssAnon, from /proc, sampled), training images/s, and the set-up
seconds before training. ``ram`` is only run up to 5,000 images (20,000 would not fit).
For ``disk``, a second run over the same data measures the start-up with the cache reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

RAM_LIMIT = 5000


def make_scenes(root: Path, count: int) -> Path:
    """``count`` 640x480 JPEGs with one to three boxes each, as COCO, plus a small validation part."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", 16)):
        folder = root / split
        (folder / "images").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(n):
            image = Image.new("RGB", (640, 480), tuple(int(v) for v in rng.integers(60, 200, 3)))
            draw = ImageDraw.Draw(image)
            for _ in range(int(rng.integers(1, 4))):
                w, h = (int(v) for v in rng.integers(40, 200, 2))
                x, y = int(rng.integers(0, 640 - w)), int(rng.integers(0, 480 - h))
                label = int(rng.integers(0, 2))
                draw.rectangle((x, y, x + w, y + h), fill=((220, 40, 40), (50, 80, 230))[label])
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            name = f"scene_{index:05d}.jpg"
            image.save(folder / "images" / name, quality=85)
            images.append({"id": index + 1, "file_name": name, "width": 640, "height": 480})
        (folder / "annotations.json").write_text(json.dumps({
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}))
    return root


def run(data: Path, mode: str, cache_dir: Path, output: Path, max_steps: int) -> dict:
    """One training process; peak RSS and RssAnon sampled from /proc while it runs."""
    command = [sys.executable, "-m", "visionlora", "train", "--task", "detection", "--data", str(data),
               "--model", "tiny-rtdetr", "--image-size", "640", "--mode", "full", "--epochs", "1",
               "--batch-size", "8", "--max-steps", str(max_steps), "--cache", mode, "--cache-dir", str(cache_dir),
               "--no-progress", "--overwrite", "--output", str(output), "--save-every", "0", "--lr", "1e-4"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peaks = {"VmHWM": 0, "RssAnon": 0}
    first_epoch = [None]

    def sample():
        while process.poll() is None:
            try:
                for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in process.stdout:
        if "parameters trainable" in line and first_epoch[0] is None:
            first_epoch[0] = time.perf_counter() - started
    process.wait()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"training failed for {mode} on {data}")
    summary = json.loads((output / "training_results" / "training_summary.json").read_text())
    return {"setup s": first_epoch[0], "peak RSS MB": peaks["VmHWM"] / 1024, "peak RssAnon MB": peaks["RssAnon"] / 1024,
            "images/s": summary["time"]["train_images_per_second"],
            "decode s": summary["data"]["cache"]["decode_seconds"], "reused": summary["data"]["cache"]["reused"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--modes", default="ram,disk,none")
    parser.add_argument("--max-steps", type=int, default=30)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in [int(s) for s in args.sizes.split(",")]:
            data = make_scenes(tmp / f"data{size}", size)
            for mode in args.modes.split(","):
                if mode == "ram" and size > RAM_LIMIT:
                    continue
                result = run(data, mode, tmp / f"cache{size}", tmp / "run", args.max_steps)
                rows.append({"images": size, "cache": mode, **result})
                if mode == "disk":
                    again = run(data, mode, tmp / f"cache{size}", tmp / "run", args.max_steps)
                    rows.append({"images": size, "cache": "disk, 2nd run", **again})
    print(f"tiny RT-DETRv2 at 640 px, batch 8, {args.max_steps} optimizer steps, 640x480 JPEG scenes")
    print(table(rows, ["images", "cache", "setup s", "decode s", "reused", "peak RSS MB", "peak RssAnon MB",
                       "images/s"]))


if __name__ == "__main__":
    main()
