"""Procedural image corpora: the pretraining data of the ``*-pretrained`` built-in models and
held-out targets to fine-tune them on.

Shapes, textures and articulated figures are drawn with seeded randomness. The shapes and
skeletons of the pretraining corpus (``PRETRAIN_SHAPES``, ``PRETRAIN_SKELETON``) never appear
in the targets (``TARGET_SHAPES``, the lizards' keypoint layout, the four-keypoint animal of
:mod:`visionlora.examples.synthetic`), so a fine-tuning result on a target measures transfer, not memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw


def _regular(n: int, inner: float | None = None) -> Callable[[], np.ndarray]:
    """A regular polygon, or a star with ``n`` points when ``inner`` (its inner radius) is given."""
    def points() -> np.ndarray:
        if inner is None:
            angles = np.arange(n) * 2 * np.pi / n
            return np.stack([np.cos(angles), np.sin(angles)], axis=1)
        angles = np.arange(2 * n) * np.pi / n
        radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
        return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)
    return points


def _polygon(*xy: float) -> Callable[[], np.ndarray]:
    return lambda: np.array(xy, dtype=float).reshape(-1, 2)


# Unit-sized outlines, centred on 0; drawn rotated, scaled and moved.
SHAPES: dict[str, Callable[[], np.ndarray]] = {
    "circle": _regular(32),
    "triangle": _regular(3),
    "square": _regular(4),
    "pentagon": _regular(5),
    "hexagon": _regular(6),
    "star5": _regular(5, inner=0.45),
    "cross": _polygon(-.3, -1, .3, -1, .3, -.3, 1, -.3, 1, .3, .3, .3, .3, 1, -.3, 1, -.3, .3, -1, .3,
                      -1, -.3, -.3, -.3),
    "arrow": _polygon(-1, -.25, .2, -.25, .2, -.7, 1, 0, .2, .7, .2, .25, -1, .25),
    "ellipse": lambda: np.stack([np.cos(a := np.linspace(0, 2 * np.pi, 32, endpoint=False)), 0.5 * np.sin(a)], axis=1),
    "bar": _polygon(-1, -.22, 1, -.22, 1, .22, -1, .22),
    "semicircle": lambda: np.stack([np.cos(a := np.linspace(0, np.pi, 17)), np.sin(a) - 0.4], axis=1),
    "kite": _polygon(0, -1, .55, -.2, 0, 1, -.55, -.2),
    # held-out shapes: only in the targets
    "star4": _regular(4, inner=0.35),
    "chevron": _polygon(-1, -.8, 0, .1, 1, -.8, 1, -.1, 0, .8, -1, -.1),
    "hourglass": _polygon(-.8, -1, .8, -1, .12, 0, .8, 1, -.8, 1, -.12, 0),
    "letter_t": _polygon(-1, -1, 1, -1, 1, -.5, .25, -.5, .25, 1, -.25, 1, -.25, -.5, -1, -.5),
    "letter_l": _polygon(-.7, -1, -.2, -1, -.2, .5, .8, .5, .8, 1, -.7, 1),
    "trapezoid": _polygon(-1, .6, 1, .6, .45, -.6, -.45, -.6),
}
PRETRAIN_SHAPES = ["circle", "triangle", "square", "pentagon", "hexagon", "star5", "cross", "arrow", "ellipse",
                   "bar", "semicircle", "kite"]
TARGET_SHAPES = ["star4", "chevron", "hourglass", "letter_t", "letter_l", "trapezoid"]
TEXTURES = ["solid", "stripes", "dots"]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Noisy two-tone background with a few distracting strokes."""
    low, high = sorted(rng.integers(40, 200, size=2))
    gradient = np.linspace(low, high + 1, size)[None, :, None].repeat(size, 0).repeat(3, 2)
    noise = rng.normal(0, 12, size=(size, size, 3))
    image = Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 3))):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, size=4))
        draw.line((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 255, size=3)), width=1)
    return image


def _texture(kind: str, colour: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
    """A ``size`` square of ``colour`` in one of ``TEXTURES``."""
    base = np.broadcast_to(colour, (size, size, 3)).astype(float)
    if kind != "solid":
        yy, xx = np.mgrid[0:size, 0:size]
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 6)
        if kind == "stripes":
            on = ((xx * np.cos(angle) + yy * np.sin(angle)) // (period / 2)) % 2 == 0
        else:
            on = ((xx % period) < period / 2) & ((yy % period) < period / 2)
        base = np.where(on[..., None], base, 255 - base)
    return Image.fromarray(base.astype(np.uint8))


def draw_shape(image: Image.Image, shape: str, texture: str, rng: np.random.Generator,
               centre: tuple[float, float], radius: float, class_mask: np.ndarray | None = None,
               class_id: int = 0) -> tuple[float, float, float, float]:
    """Paint ``shape`` in ``texture`` (random colour and rotation) on ``image``; return its box.
    Given a ``class_mask``, its pixels under the shape become ``class_id``."""
    outline = SHAPES[shape]()
    angle = rng.uniform(-0.3, 0.3)  # upright, give or take: orientation is part of some shapes' identity
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    aspect = np.array([1.0, rng.uniform(0.75, 1.0)])
    points = (outline * aspect) @ rotation.T * radius + np.asarray(centre)
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in points], fill=255)
    colour = rng.integers(30, 256, size=3)
    image.paste(_texture(texture, colour, rng, image.size[0]), (0, 0), mask)
    if class_mask is not None:
        class_mask[np.asarray(mask) > 0] = class_id
    x0, y0 = np.clip(points.min(axis=0), 0, image.size[0])
    x1, y1 = np.clip(points.max(axis=0), 0, image.size[0])
    return float(x0), float(y0), float(x1), float(y1)


def shape_image(label: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """One classification image: ``label`` is ``shape`` or ``shape/texture``."""
    shape, _, texture = label.partition("/")
    image = _background(rng, size)
    radius = rng.uniform(0.28, 0.42) * size
    centre = rng.uniform(radius * 0.8, size - radius * 0.8, size=2)
    draw_shape(image, shape, texture or str(rng.choice(TEXTURES)), rng, tuple(centre), radius)
    return image


def pretraining_classes() -> list[str]:
    """Every pretraining shape in every texture: 36 classes."""
    return [f"{shape}/{texture}" for shape in PRETRAIN_SHAPES for texture in TEXTURES]


def write_shape_folder(root: Path, classes: list[str], per_class_train: int, per_class_val: int,
                       seed: int = 0, size: int = 40) -> Path:
    """Write ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` of :func:`shape_image`."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for label in classes:
            folder = Path(root) / split / label.replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                shape_image(label, rng, size).save(folder / f"{index:04d}.png")
    return Path(root)


# -- detection -----------------------------------------------------------------------------
def shape_scene(shapes: list[str], rng: np.random.Generator, size: int = 64,
                max_objects: int = 5) -> tuple[Image.Image, list[list[float]], list[str]]:
    """An image with 1..max_objects shapes: (image, [[x0, y0, x1, y1]], [shape])."""
    image = _background(rng, size)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        shape = str(rng.choice(shapes))
        radius = rng.uniform(0.08, 0.22) * size
        centre = rng.uniform(radius, size - radius, size=2)
        box = draw_shape(image, shape, str(rng.choice(TEXTURES)), rng, tuple(centre), radius)
        if box[2] - box[0] >= 3 and box[3] - box[1] >= 3:
            boxes.append([round(v, 2) for v in box])
            labels.append(shape)
    return image, boxes, labels


def write_shape_scenes(root: Path, shapes: list[str], n_train: int, n_val: int, seed: int = 0,
                       size: int = 64, max_objects: int = 5) -> Path:
    """Write ``root/train`` and ``root/val`` as COCO JSON with images in ``images/``."""
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(shapes)]
    for split, count in (("train", n_train), ("val", n_val)):
        folder = Path(root) / split
        (folder / "images").mkdir(parents=True, exist_ok=True)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for index in range(count):
            image, boxes, labels = shape_scene(shapes, rng, size, max_objects)
            name = f"{index:05d}.png"
            image.save(folder / "images" / name)
            images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
            for (x0, y0, x1, y1), label in zip(boxes, labels):
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                    "category_id": shapes.index(label) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                    "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        (folder / "annotations.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return Path(root)


# -- segmentation --------------------------------------------------------------------------
def write_shape_segmentation(root: Path, shapes: list[str], n_train: int, n_val: int, seed: int = 0,
                             size: int = 64, max_objects: int = 5) -> Path:
    """Write ``root/train`` and ``root/val`` as images+masks folders of shape scenes (class 0 is the
    background, then ``shapes``; later shapes cover earlier ones), with ``root/classes.txt``."""
    from visionlora.examples.segmentation import palette_mask

    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for folder in ("images", "masks"):
            (Path(root) / split / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, mask = _background(rng, size), np.zeros((size, size), dtype=np.uint8)
            for _ in range(int(rng.integers(1, max_objects + 1))):
                shape = str(rng.choice(shapes))
                radius = rng.uniform(0.1, 0.25) * size
                centre = rng.uniform(radius, size - radius, size=2)
                draw_shape(image, shape, str(rng.choice(TEXTURES)), rng, tuple(centre), radius, mask,
                           shapes.index(shape) + 1)
            image.save(Path(root) / split / "images" / f"{index:05d}.png")
            palette_mask(mask).save(Path(root) / split / "masks" / f"{index:05d}.png")
    (Path(root) / "classes.txt").write_text("\n".join(["background", *shapes]) + "\n")
    return Path(root)


# -- pose ------------------------------------------------------------------------------------
# A two-armed, two-legged walker: its joints are the pretraining keypoints.
PRETRAIN_SKELETON_KEYPOINTS = ["head", "neck", "pelvis", "left_hand", "right_hand", "left_foot", "right_foot",
                               "left_elbow", "right_elbow", "left_knee", "right_knee"]
PRETRAIN_SKELETON = [["head", "neck"], ["neck", "pelvis"], ["neck", "left_elbow"], ["left_elbow", "left_hand"],
                     ["neck", "right_elbow"], ["right_elbow", "right_hand"], ["pelvis", "left_knee"],
                     ["left_knee", "left_foot"], ["pelvis", "right_knee"], ["right_knee", "right_foot"]]


def limb_end(start: np.ndarray, angle: float, length: float, unit: float) -> np.ndarray:
    """The far end of a limb from ``start``: ``length`` units long, ``angle`` radians from upright."""
    return start + length * unit * np.array([np.sin(angle), -np.cos(angle)])


def walker_points(rng: np.random.Generator, size: int) -> np.ndarray:
    """Joint positions of a randomly posed walker, (11, 2), inside a ``size`` square."""
    unit = size * rng.uniform(0.13, 0.18)
    lean = rng.uniform(-0.5, 0.5)
    pelvis = np.array([size / 2, size * 0.58]) + rng.uniform(-0.06, 0.06, size=2) * size
    step = partial(limb_end, unit=unit)
    neck = step(pelvis, lean, 1.8)
    head = step(neck, lean + rng.uniform(-0.4, 0.4), 0.8)
    points = {"head": head, "neck": neck, "pelvis": pelvis}
    for side, sign in (("left", -1), ("right", 1)):
        shoulder_angle = lean + np.pi + sign * rng.uniform(0.3, 1.8)
        points[f"{side}_elbow"] = step(neck, shoulder_angle, 1.0)
        points[f"{side}_hand"] = step(points[f"{side}_elbow"], shoulder_angle + sign * rng.uniform(-1.2, 1.2), 0.9)
        hip_angle = np.pi + sign * rng.uniform(0.05, 0.7)
        points[f"{side}_knee"] = step(pelvis, hip_angle, 1.2)
        points[f"{side}_foot"] = step(points[f"{side}_knee"], hip_angle + rng.uniform(-0.6, 0.6), 1.1)
    return np.stack([points[name] for name in PRETRAIN_SKELETON_KEYPOINTS])


def walker_image(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, np.ndarray]:
    """A walker drawn with limbs of one colour and a lighter head: (image, (11, 2) points)."""
    image = _background(rng, size)
    points = walker_points(rng, size)
    _draw_figure(image, rng, points, PRETRAIN_SKELETON_KEYPOINTS, PRETRAIN_SKELETON, ("left_hand", "right_hand"))
    return image, points


def _draw_figure(image: Image.Image, rng: np.random.Generator, points: np.ndarray, keypoints: list[str],
                 skeleton: list[list[str]], marked: tuple[str, ...], tail: np.ndarray | None = None) -> None:
    """Limbs of one random colour along ``skeleton``, a lighter head, the ``marked`` keypoints in the
    opposite colour, and a thinner tail from the hips where given."""
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    width = max(2, int(image.width * rng.uniform(0.04, 0.07)))
    index = {name: i for i, name in enumerate(keypoints)}
    if tail is not None:
        draw.line((*points[index["hips"]], *tail), fill=colour, width=max(1, width // 2))
    for a, b in skeleton:
        draw.line((*points[index[a]], *points[index[b]]), fill=colour, width=width)
    hx, hy = points[index["head"]]
    r = width * 1.4
    draw.ellipse((hx - r, hy - r, hx + r, hy + r), fill=tuple(min(255, c + 60) for c in colour))
    for name in marked:
        x, y = points[index[name]]
        draw.ellipse((x - width, y - width, x + width, y + width),
                     fill=(255 - colour[0], 255 - colour[1], 255 - colour[2]))


def write_walkers(root: Path, n_train: int, n_val: int, seed: int = 0, size: int = 64) -> Path:
    """Write ``root/train`` and ``root/val`` as COCO keypoints, one walker per image."""
    figure = Figure("walker", PRETRAIN_SKELETON_KEYPOINTS, PRETRAIN_SKELETON, walker_image)
    return write_figures(root, figure, n_train, n_val, seed, size)


@dataclass(frozen=True)
class Figure:
    """An articulated figure: its keypoints, its skeleton and how to draw one, (rng, size) -> (image, points)."""

    name: str
    keypoints: list[str]
    skeleton: list[list[str]]
    draw: Callable[[np.random.Generator, int], tuple[Image.Image, np.ndarray]]


def write_figures(root: Path, figure: Figure, n_train: int, n_val: int, seed: int = 0, size: int = 64) -> Path:
    """Write ``root/train`` and ``root/val`` as COCO keypoints, one ``figure`` per image."""
    rng = np.random.default_rng(seed)
    skeleton = [[figure.keypoints.index(a) + 1, figure.keypoints.index(b) + 1] for a, b in figure.skeleton]
    categories = [{"id": 1, "name": figure.name, "keypoints": figure.keypoints, "skeleton": skeleton}]
    for split, count in (("train", n_train), ("val", n_val)):
        folder = Path(root) / split
        (folder / "images").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            image, points = figure.draw(rng, size)
            name = f"{index:05d}.png"
            image.save(folder / "images" / name)
            images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
            annotations.append({"id": index + 1, "image_id": index + 1, "category_id": 1,
                                **_keypoint_annotation(points, size)})
        (folder / "annotations.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return Path(root)


def _keypoint_annotation(points: np.ndarray, size: int) -> dict:
    """COCO keypoints, count, box (the points' extent and 4 px) and area; points outside the image unlabelled."""
    inside = [bool(x >= 0 and y >= 0 and x < size and y < size) for x, y in points.tolist()]
    flat = [v for (x, y), ok in zip(points, inside) for v in ((float(x), float(y), 2) if ok else (0, 0, 0))]
    x0, y0 = np.clip(points.min(axis=0) - 4, 0, size)
    x1, y1 = np.clip(points.max(axis=0) + 4, 0, size)
    return {"keypoints": flat, "num_keypoints": sum(inside), "iscrowd": 0,
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "area": float((x1 - x0) * (y1 - y0))}


# -- a lizard seen from above: a new keypoint layout drawn like the walkers -------------------
# As many keypoints as the walker, in its order (its hands are the front feet, its elbows the
# front knees), placed where no walker has them: front legs reaching forward, hind legs sprawled.
LIZARD_KEYPOINTS = ["head", "shoulders", "hips", "left_front_foot", "right_front_foot", "left_hind_foot",
                    "right_hind_foot", "left_front_knee", "right_front_knee", "left_hind_knee", "right_hind_knee"]
LIZARD_SKELETON = [["head", "shoulders"], ["shoulders", "hips"], ["shoulders", "left_front_knee"],
                   ["left_front_knee", "left_front_foot"], ["shoulders", "right_front_knee"],
                   ["right_front_knee", "right_front_foot"], ["hips", "left_hind_knee"],
                   ["left_hind_knee", "left_hind_foot"], ["hips", "right_hind_knee"],
                   ["right_hind_knee", "right_hind_foot"]]


def lizard_points(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Joint positions of a randomly posed lizard, (11, 2), and the tip of its tail."""
    unit = size * rng.uniform(0.11, 0.14)
    lean = rng.uniform(-0.4, 0.4)
    hips = np.array([size / 2, size * 0.6]) + rng.uniform(-0.05, 0.05, size=2) * size
    step = partial(limb_end, unit=unit)
    shoulders = step(hips, lean, 2.2)
    points = {"hips": hips, "shoulders": shoulders, "head": step(shoulders, lean + rng.uniform(-0.3, 0.3), 0.8)}
    for side, sign in (("left", -1), ("right", 1)):
        front = lean + sign * rng.uniform(1.3, 1.9)
        points[f"{side}_front_knee"] = step(shoulders, front, 1.0)
        points[f"{side}_front_foot"] = step(points[f"{side}_front_knee"], front - sign * rng.uniform(0.4, 1.0), 1.0)
        hind = lean + sign * rng.uniform(1.8, 2.4)
        points[f"{side}_hind_knee"] = step(hips, hind, 1.0)
        points[f"{side}_hind_foot"] = step(points[f"{side}_hind_knee"], hind + sign * rng.uniform(0.3, 1.0), 1.0)
    tail = step(hips, lean + np.pi + rng.uniform(-0.5, 0.5), 1.6)
    return np.stack([points[name] for name in LIZARD_KEYPOINTS]), tail


def lizard_image(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, np.ndarray]:
    """A lizard in the walkers' style: limbs of one colour, a lighter head, front feet in the opposite
    colour, and a thinner tail. (image, (11, 2) points)."""
    image = _background(rng, size)
    points, tail = lizard_points(rng, size)
    _draw_figure(image, rng, points, LIZARD_KEYPOINTS, LIZARD_SKELETON, ("left_front_foot", "right_front_foot"), tail)
    return image, points


# -- held-out targets, as the demo uses them ---------------------------------------------------
TARGET_SEED = 100  # no pretraining corpus is drawn with it


def write_target_shapes(root: Path, per_class_train: int, per_class_val: int, shapes: int = len(TARGET_SHAPES),
                        seed: int = TARGET_SEED) -> Path:
    """Classification: the first ``shapes`` held-out shapes, solid, as class folders."""
    classes = [f"{shape}/solid" for shape in TARGET_SHAPES[:shapes]]
    return write_shape_folder(root, classes, per_class_train, per_class_val, seed=seed)


def write_target_scenes(root: Path, n_train: int, n_val: int, shapes: int = len(TARGET_SHAPES),
                        max_objects: int = 5, seed: int = TARGET_SEED) -> Path:
    """Detection: scenes of the first ``shapes`` held-out shapes, COCO JSON."""
    return write_shape_scenes(root, TARGET_SHAPES[:shapes], n_train, n_val, seed=seed, max_objects=max_objects)


def write_target_segmentation(root: Path, n_train: int, n_val: int, shapes: int = len(TARGET_SHAPES),
                              max_objects: int = 5, seed: int = TARGET_SEED) -> Path:
    """Segmentation: scenes of the first ``shapes`` held-out shapes, images+masks."""
    return write_shape_segmentation(root, TARGET_SHAPES[:shapes], n_train, n_val, seed=seed, max_objects=max_objects)


def write_lizards(root: Path, n_train: int, n_val: int, seed: int = TARGET_SEED, size: int = 64) -> Path:
    """Pose: lizards seen from above (the walker's 11 keypoints moved to new places), COCO keypoints."""
    figure = Figure("lizard", LIZARD_KEYPOINTS, LIZARD_SKELETON, lizard_image)
    return write_figures(root, figure, n_train, n_val, seed, size)
