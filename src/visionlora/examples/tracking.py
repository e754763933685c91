"""A generated video for multi-object tracking, with ground-truth identities.

A few shapes (discs and squares, each its own colour, all one label) move at constant speed,
bounce off the frame's edges, cross and pass behind one another: the nearer shape is drawn
over the farther one, which may be hidden for a few frames. A detector finds "shape"s; only a
tracker can tell which is which from frame to frame.

The ground truth is MOT Challenge text (``frame,id,x,y,w,h,1,1,visibility``, frames from 1),
one row per shape whose visible part is at least ``MIN_VISIBLE`` of it. The same scenes, from
other seeds, make a COCO JSON detection set to train the detector on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

LABEL = "shape"
COLOURS = [(230, 60, 60), (60, 200, 90), (70, 120, 240), (240, 200, 50), (200, 80, 220), (60, 210, 220)]
MIN_VISIBLE = 0.5  # a shape less visible than this is not in the ground truth (nor labelled for training)


@dataclass
class Mover:
    """One shape: where it is, where it goes (pixels per frame), its size, look and depth."""

    identity: int
    centre: np.ndarray
    velocity: np.ndarray
    radius: float
    square: bool
    colour: tuple[int, int, int]

    def step(self, size: int) -> None:
        """Move one frame, bouncing off the edges."""
        self.centre = self.centre + self.velocity
        for axis in (0, 1):
            if not self.radius <= self.centre[axis] <= size - self.radius:
                self.velocity[axis] = -self.velocity[axis]
                self.centre[axis] = float(np.clip(self.centre[axis], self.radius, size - self.radius))

    def box(self) -> list[float]:
        x, y = self.centre
        return [round(float(v), 2) for v in (x - self.radius, y - self.radius, x + self.radius, y + self.radius)]


def _movers(rng: np.random.Generator, count: int, size: int) -> list[Mover]:
    movers = []
    for identity in range(1, count + 1):
        radius = float(rng.uniform(0.09, 0.12) * size)
        speed, angle = rng.uniform(0.025, 0.045) * size, rng.uniform(0, 2 * np.pi)
        movers.append(Mover(identity, rng.uniform(radius, size - radius, size=2),
                            np.array([np.cos(angle), np.sin(angle)]) * speed, radius, bool(rng.integers(0, 2)),
                            COLOURS[(identity - 1) % len(COLOURS)]))
    return movers  # drawn in this order: the last is the nearest


def _draw(rng: np.random.Generator, movers: list[Mover], size: int) -> tuple[Image.Image, list[float]]:
    """The frame, and the visible fraction of each mover."""
    noise = rng.normal(60, 8, size=(size, size, 3))
    image = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    owner = np.zeros((size, size), dtype=np.int32)
    areas = []
    for mover in movers:
        mask = Image.new("L", (size, size), 0)
        shape = ImageDraw.Draw(mask).rectangle if mover.square else ImageDraw.Draw(mask).ellipse
        shape(mover.box(), fill=255)
        pixels = np.asarray(mask) > 0
        owner[pixels] = mover.identity
        areas.append(max(1, int(pixels.sum())))
        image.paste(Image.new("RGB", (size, size), mover.colour), (0, 0), mask)
    visible = [float((owner == mover.identity).sum()) / area for mover, area in zip(movers, areas)]
    return image, visible


def moving_shapes(frames: int, seed: int = 0, count: int = 4,
                  size: int = 64) -> Iterator[tuple[Image.Image, list[tuple[int, list[float], float]]]]:
    """Each frame, and its shapes as (identity, [x0, y0, x1, y1], visible fraction)."""
    rng = np.random.default_rng(seed)
    movers = _movers(rng, count, size)
    for _ in range(frames):
        image, visible = _draw(rng, movers, size)
        yield image, [(m.identity, m.box(), v) for m, v in zip(movers, visible)]
        for mover in movers:
            mover.step(size)


def write_tracking_video(path: Path, frames: int = 60, fps: float = 10.0, seed: int = 0, count: int = 4,
                         size: int = 64) -> tuple[Path, Path]:
    """An MPEG-4 video of :func:`moving_shapes` and its ground truth beside it (``NAME.gt.txt``)."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (size, size))
    rows = []
    for number, (image, shapes) in enumerate(moving_shapes(frames, seed, count, size), start=1):
        writer.write(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))
        rows += [f"{number},{identity},{x0},{y0},{round(x1 - x0, 2)},{round(y1 - y0, 2)},1,1,{visible:.3f}"
                 for identity, (x0, y0, x1, y1), visible in shapes if visible >= MIN_VISIBLE]
    writer.release()
    truth = path.with_suffix(".gt.txt")
    truth.write_text("".join(row + "\n" for row in rows))
    return path, truth


def write_tracking_frames(root: Path, n_train: int, n_val: int, seed: int = 1, count: int = 4,
                          size: int = 64, every: int = 5) -> Path:
    """``root/train`` and ``root/val`` as COCO JSON: every ``every``-th frame of videos of
    :func:`moving_shapes` (a new video each ``count`` frames kept), the visible shapes labelled."""
    for offset, (split, total) in enumerate((("train", n_train), ("val", n_val))):
        folder = Path(root) / split
        (folder / "images").mkdir(parents=True, exist_ok=True)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        while len(images) < total:
            video_seed = seed * 1000 + offset * 500 + len(images)
            for image, shapes in list(moving_shapes(count * every, video_seed, count, size))[::every]:
                if len(images) == total:
                    break
                images.append(_save_frame(folder, image, len(images) + 1))
                annotations += [_annotation(len(annotations) + 1, len(images), box) for _, box, visible in shapes
                                if visible >= MIN_VISIBLE]
        (folder / "annotations.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": LABEL}]}))
    return Path(root)


def _save_frame(folder: Path, image: Image.Image, image_id: int) -> dict[str, Any]:
    name = f"{image_id:05d}.png"
    image.save(folder / "images" / name)
    return {"id": image_id, "file_name": name, "width": image.width, "height": image.height}


def _annotation(annotation_id: int, image_id: int, box: list[float]) -> dict[str, Any]:
    x0, y0, x1, y1 = box
    return {"id": annotation_id, "image_id": image_id, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
