"""Deterministic generated image sets with known labels, for the demo and the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CLASS_COLOURS = {
    "red_disc": (220, 40, 40),
    "green_disc": (40, 190, 60),
    "blue_disc": (50, 80, 230),
    "yellow_disc": (235, 215, 40),
}


def classification_image(label: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A noisy grey background with one disc whose colour gives the class."""
    background = rng.integers(60, 180, size=(size, size, 1)).repeat(3, axis=2)
    noise = rng.integers(-25, 25, size=(size, size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    radius = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(radius, size - radius, size=2))
    colour = tuple(int(np.clip(c + rng.integers(-20, 20), 0, 255)) for c in CLASS_COLOURS[label])
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    return image


def make_classification_folder(
    root: Path, per_class_train: int = 30, per_class_val: int = 10, classes: list[str] | None = None, seed: int = 0
) -> Path:
    """Write ``root/train/<class>/*.png`` and ``root/val/<class>/*.png``; return ``root``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for label in classes or list(CLASS_COLOURS):
            folder = Path(root) / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                classification_image(label, rng).save(folder / f"{label}_{index:03d}.png")
    return Path(root)


# -- detection ---------------------------------------------------------------------------
DETECTION_COLOURS = {"red_box": (220, 40, 40), "blue_box": (50, 80, 230)}
DETECTION_FORMATS = ("coco", "voc", "yolo")
# file name, (width, height), boxes (x0, y0, x1, y1) and their labels
DetectionScene = tuple[str, tuple[int, int], list[list[int]], list[str]]


def detection_scene(rng: np.random.Generator, size: int = 64,
                    max_objects: int = 2) -> tuple[Image.Image, list[list[int]], list[str]]:
    """An image with 1..max_objects coloured rectangles: (image, [[x0, y0, x1, y1]], [label])."""
    background = rng.integers(90, 160, size=(size, size, 1)).repeat(3, axis=2)
    image = Image.fromarray(np.clip(background + rng.integers(-15, 15, size=(size, size, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = list(DETECTION_COLOURS)[int(rng.integers(len(DETECTION_COLOURS)))]
        w, h = (int(v) for v in rng.integers(size // 5, size // 2, size=2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        draw.rectangle((x0, y0, x0 + w - 1, y0 + h - 1), fill=DETECTION_COLOURS[label])
        boxes.append([x0, y0, x0 + w, y0 + h])
        labels.append(label)
    return image, boxes, labels


def make_detection_dataset(
    root: Path, fmt: str = "coco", n_train: int = 12, n_val: int = 4, seed: int = 0, max_objects: int = 2
) -> Path:
    """Write ``root/train`` and ``root/val`` in COCO, VOC or YOLO layout; return ``root``."""
    rng = np.random.default_rng(seed)
    names = list(DETECTION_COLOURS)
    for split, count in (("train", n_train), ("val", n_val)):
        folder = Path(root) / split
        (folder / "images").mkdir(parents=True, exist_ok=True)
        scenes = []
        for index in range(count):
            image, boxes, labels = detection_scene(rng, max_objects=max_objects)
            file_name = f"scene_{index:03d}.png"
            image.save(folder / "images" / file_name)
            scenes.append((file_name, image.size, boxes, labels))
        {"coco": _write_coco, "voc": _write_voc, "yolo": _write_yolo}[fmt](folder, scenes, names)
    return Path(root)


def _write_coco(folder: Path, scenes: list[DetectionScene], names: list[str]) -> None:
    import json

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (file_name, (w, h), boxes, labels) in enumerate(scenes, start=1):
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        for (x0, y0, x1, y1), label in zip(boxes, labels):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": names.index(label) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    (folder / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                         "categories": categories}))


def _write_voc(folder: Path, scenes: list[DetectionScene], names: list[str]) -> None:
    (folder / "annotations").mkdir(exist_ok=True)
    for file_name, (w, h), boxes, labels in scenes:
        objects = "".join(
            f"<object><name>{label}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for (x0, y0, x1, y1), label in zip(boxes, labels)
        )
        xml = (f"<annotation><filename>{file_name}</filename><size><width>{w}</width><height>{h}</height>"
               f"<depth>3</depth></size>{objects}</annotation>")
        (folder / "annotations" / f"{Path(file_name).stem}.xml").write_text(xml)


def _write_yolo(folder: Path, scenes: list[DetectionScene], names: list[str]) -> None:
    (folder / "labels").mkdir(exist_ok=True)
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    for file_name, (w, h), boxes, labels in scenes:
        lines = [
            f"{names.index(label)} {(x0 + x1) / 2 / w:.8f} {(y0 + y1) / 2 / h:.8f} "
            f"{(x1 - x0) / w:.8f} {(y1 - y0) / h:.8f}"
            for (x0, y0, x1, y1), label in zip(boxes, labels)
        ]
        (folder / "labels" / f"{Path(file_name).stem}.txt").write_text("\n".join(lines) + "\n")


# -- pose ----------------------------------------------------------------------------------
POSE_KEYPOINTS = ["snout", "leftear", "rightear", "tailbase"]
POSE_SKELETON = [["snout", "leftear"], ["snout", "rightear"], ["leftear", "tailbase"], ["rightear", "tailbase"]]
POSE_COLOURS = {"snout": (230, 40, 40), "leftear": (240, 220, 40), "rightear": (240, 220, 40),
                "tailbase": (40, 90, 230)}


def pose_scene(rng: np.random.Generator, size: int = 96) -> tuple[Image.Image, np.ndarray]:
    """A grey 'animal' seen from above with coloured marks at its keypoints: (image, (4, 2) points)."""
    background = rng.integers(70, 150, size=(size, size, 1)).repeat(3, axis=2)
    image = Image.fromarray(np.clip(background + rng.integers(-12, 12, size=(size, size, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    length = rng.uniform(0.25, 0.4) * size
    angle = rng.uniform(0, 2 * np.pi)
    centre = rng.uniform(0.35, 0.65, size=2) * size
    axis = np.array([np.cos(angle), np.sin(angle)])
    side = np.array([-axis[1], axis[0]])
    snout, tail = centre + axis * length / 2, centre - axis * length / 2
    left, right = (centre + axis * length * 0.25 + side * length * 0.2,
                   centre + axis * length * 0.25 - side * length * 0.2)
    points = np.stack([snout, left, right, tail])
    draw.line((*tail, *snout), fill=(200, 200, 200), width=max(2, int(length * 0.25)))
    for name, (x, y) in zip(POSE_KEYPOINTS, points):
        draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=POSE_COLOURS[name])
    return image, points


def make_pose_dataset(root: Path, fmt: str = "coco", n_train: int = 12, n_val: int = 4, seed: int = 0,
                      unlabelled: tuple[int, int] | None = None) -> Path:
    """Write a COCO-keypoints (``train/`` + ``val/``) or DeepLabCut project of pose scenes.

    ``unlabelled=(image, keypoint)`` leaves that keypoint of that image (counted over
    train then val) unlabelled, to exercise missing labels.
    """
    rng = np.random.default_rng(seed)
    scenes = [pose_scene(rng) for _ in range(n_train + n_val)]
    root = Path(root)
    if fmt == "coco":
        for split, part in (("train", scenes[:n_train]), ("val", scenes[n_train:])):
            offset = 0 if split == "train" else n_train
            _write_coco_keypoints(root / split, part, offset, unlabelled)
    else:
        _write_deeplabcut(root, scenes, n_train / (n_train + n_val), unlabelled)
    return root


def _write_coco_keypoints(folder: Path, scenes: list[tuple[Image.Image, np.ndarray]], offset: int,
                          unlabelled: tuple[int, int] | None) -> None:
    import json

    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index, (image, points) in enumerate(scenes):
        name = f"frame_{offset + index:03d}.png"
        image.save(folder / "images" / name)
        flat: list[float] = []
        for k, (x, y) in enumerate(points):
            hidden = unlabelled == (offset + index, k)
            flat += [0, 0, 0] if hidden else [float(x), float(y), 2]
        x0, y0 = points.min(axis=0) - 4
        x1, y1 = points.max(axis=0) + 4
        images.append({"id": index + 1, "file_name": name, "width": image.width, "height": image.height})
        annotations.append({"id": index + 1, "image_id": index + 1, "category_id": 1, "keypoints": flat,
                            "num_keypoints": sum(1 for v in flat[2::3] if v), "iscrowd": 0,
                            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                            "area": float((x1 - x0) * (y1 - y0))})
    skeleton = [[POSE_KEYPOINTS.index(a) + 1, POSE_KEYPOINTS.index(b) + 1] for a, b in POSE_SKELETON]
    categories = [{"id": 1, "name": "animal", "keypoints": POSE_KEYPOINTS, "skeleton": skeleton}]
    (folder / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                         "categories": categories}))


def _write_deeplabcut(root: Path, scenes: list[tuple[Image.Image, np.ndarray]], training_fraction: float,
                      unlabelled: tuple[int, int] | None) -> None:
    import yaml

    frames = root / "labeled-data" / "video1"
    frames.mkdir(parents=True, exist_ok=True)
    config = {"Task": "synthetic", "scorer": "test", "bodyparts": POSE_KEYPOINTS, "skeleton": POSE_SKELETON,
              "TrainingFraction": [round(training_fraction, 4)], "multianimalproject": False}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [
        "scorer," + ",".join(["test"] * 2 * len(POSE_KEYPOINTS)),
        "bodyparts," + ",".join(n for n in POSE_KEYPOINTS for _ in range(2)),
        "coords," + ",".join(["x", "y"] * len(POSE_KEYPOINTS)),
    ]
    for index, (image, points) in enumerate(scenes):
        name = f"frame_{index:03d}.png"
        image.save(frames / name)
        cells = []
        for k, (x, y) in enumerate(points):
            cells += ["", ""] if unlabelled == (index, k) else [repr(float(x)), repr(float(y))]
        lines.append(f"labeled-data/video1/{name}," + ",".join(cells))
    (frames / "CollectedData_test.csv").write_text("\n".join(lines) + "\n")


def make_pose_video(path: Path, frames: int = 30, fps: float = 10.0, size: int = 96, seed: int = 0) -> Path:
    """An MPEG-4 video of pose scenes (a new animal every frame), written with OpenCV."""
    import cv2

    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (size, size))
    for _ in range(frames):
        image, _ = pose_scene(rng, size)
        writer.write(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))
    writer.release()
    return path
