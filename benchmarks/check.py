"""How fast ``visionlora check`` reads a dataset, with and without decoding JPEGs at reduced size.

    python benchmarks/check.py [--count 3000] [--threads 2]

Generates ``--count`` 640x480 JPEG photos-alike (a gradient, random shapes, noise) as an ImageFolder
of 4 classes with 20% in val/, then runs the checks (read, inspect every image, hash, compare every
pair) twice: as the command does (a JPEG decoded by PIL's draft at 1/8 scale for its hash) and with
full decoding, on ``--threads`` threads. Prints images/s and the findings (none are planted, so any
is a false alarm).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402


def make_photos(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` 640x480 JPEGs in ``root/{train,val}/<class>/``."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 640)[None, :, None]
    for index in range(count):
        split = "val" if index % 5 == 0 else "train"
        folder = root / split / f"class_{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        low, high = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
        pixels = (low + (high - low) * ramp).repeat(480, axis=0) + rng.normal(0, 12, (480, 640, 3))
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 6))):
            x, y = int(rng.integers(0, 560)), int(rng.integers(0, 400))
            w, h = (int(v) for v in rng.integers(30, 240, 2))
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
        image.save(folder / f"photo_{index:05d}.jpg", quality=85)
    return root


def measure(data: Path, threads: int, draft: bool) -> dict:
    from visionlora.checking import scan
    from visionlora.data import checks
    from visionlora.tasks import get_task

    side = checks.HASH_SIDE
    checks.HASH_SIDE = side if draft else 1_000_000  # a draft as large as the image decodes it whole
    original = scan.inspect_all
    scan.inspect_all = lambda images, progress=True, workers=None: original(images, False, threads)
    try:
        start = time.perf_counter()
        result = scan.run_checks(get_task("classification"), str(data), model="tiny", progress=False)
        seconds = time.perf_counter() - start
    finally:
        checks.HASH_SIDE, scan.inspect_all = side, original
    return {"decoding": "draft (1/8 scale)" if draft else "full", "images": result.images,
            "seconds": round(seconds, 2), "images/s": round(result.images / seconds, 1),
            "findings": len(result.findings)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        data = make_photos(Path(tmp) / "photos", args.count)
        print(f"generated {args.count} 640x480 JPEGs in {time.perf_counter() - started:.0f} s", flush=True)
        from visionlora.data.checks import inspect_image

        inspect_image(next(data.rglob("*.jpg")), "warm-up", "train")  # imports imagehash and scipy once
        rows = [measure(data, args.threads, draft) for draft in (True, False)]
    print(table(rows, ["decoding", "images", "seconds", "images/s", "findings"]))


if __name__ == "__main__":
    main()
