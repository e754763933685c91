"""Draw predictions on images: a label, boxes, keypoints and skeletons.

Captions (an image's label, a box's label and score, a track's number) are rendered once each, white on their
colour, and pasted: a video draws the same few captions on every frame.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Mapping, Sequence

from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def _line_width(image: Image.Image) -> int:
    return max(1, round(max(image.size) / 300))


@lru_cache(maxsize=4096)
def _caption(text: str, background: tuple[int, int, int], pad: int) -> tuple[Image.Image, int, int]:
    """``text`` in white on ``background`` with ``pad`` pixels around its ink, and where the tile's
    corner lies from the point text drawn there would be anchored at (x, y offsets)."""
    left, top, right, bottom = (int(v) for v in ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text))
    tile = Image.new("RGB", (right - left + 1 + 2 * pad, bottom - top + 1 + 2 * pad), background)
    ImageDraw.Draw(tile).text((pad - left, pad - top), text, fill=(255, 255, 255))
    return tile, left - pad, top - pad


def _paste_caption(image: Image.Image, xy: tuple[float, float], text: str, background: tuple[int, int, int],
                   pad: int = 0) -> None:
    """Paste ``text``'s tile where ``ImageDraw.text(xy, text)`` would draw it (clipped at the edges)."""
    tile, dx, dy = _caption(text, background, pad)
    image.paste(tile, (round(xy[0]) + dx, round(xy[1]) + dy))


def draw_label(image: Image.Image, text: str) -> Image.Image:
    out = image.copy()
    _paste_caption(out, (4, 4), text, (0, 0, 0), pad=2)
    return out


def draw_boxes(image: Image.Image, boxes: Sequence[dict], label_names: Sequence[str]) -> Image.Image:
    """Boxes given as {"label", "score", "box": [x0, y0, x1, y1]}."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = _line_width(out)
    for item in boxes:
        index = label_names.index(item["label"]) if item["label"] in label_names else 0
        x0, y0, x1, y1 = item["box"]
        draw.rectangle((x0, y0, x1, y1), outline=colour(index), width=width)
        caption = f"{item['label']} {item['score']:.2f}"
        height = _caption(caption, colour(index), 0)[0].height - 1
        _paste_caption(out, (x0, y0 - height), caption, colour(index))  # above the box's corner
    return out


def draw_keypoints(
    image: Image.Image, points: Sequence[Sequence[float]], scores: Sequence[float],
    skeleton: Sequence[Sequence[int]], threshold: float = 0.0,
) -> Image.Image:
    """Keypoints (x, y) as dots, and skeleton edges (index pairs) as lines."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = _line_width(out)
    radius = width + 2
    visible = [score >= threshold for score in scores]
    for a, b in skeleton:
        if visible[a] and visible[b]:
            draw.line((*points[a], *points[b]), fill=(255, 255, 255), width=width)
    for index, ((x, y), shown) in enumerate(zip(points, visible)):
        if shown:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour(index), outline=(0, 0, 0))
    return out


def draw_tracks(image: Image.Image, tracked: Sequence[tuple[int, Sequence[float]]],
                trails: Mapping[int, Sequence[tuple[float, float]]]) -> Image.Image:
    """Tracked boxes as (identity, [x0, y0, x1, y1]): each identity's number at its box's corner,
    and its trail (box centres, oldest first) as a line, in the identity's colour."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = _line_width(out)
    for identity, box in tracked:
        x0, y1 = box[0], box[3]
        path = list(trails.get(identity, ()))
        if len(path) > 1:
            draw.line([point for xy in path for point in xy], fill=colour(identity), width=width)
        _paste_caption(out, (x0, y1), f"#{identity}", colour(identity), pad=1)
    return out
