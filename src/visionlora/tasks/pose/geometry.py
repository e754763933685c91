"""Top-down keypoint geometry: crop a box to the model input, encode heatmaps, decode them back.

The crop follows transformers' ViTPose image processor exactly (box -> centre and scale
with 1.25 padding, the unbiased warp matrix of Huang et al., CVPR 2020), so a model trained
here also works with ``VitPoseImageProcessor``; decoding is the processor's own
``keypoints_from_heatmaps`` (DARK sub-pixel refinement, mapped back to original pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# Heatmap Gaussian width and DARK kernel for 64x48 heatmaps; scaled with the heatmap width.
BASE_HEATMAP_WIDTH = 48
BASE_SIGMA = 2.0
BASE_KERNEL = 11
PIXEL_STD = 200.0  # ViTPose expresses crop scales in units of 200 pixels
PADDING = 1.25


@dataclass(frozen=True)
class CropBox:
    """Centre (x, y) and scale (w, h, in units of 200 pixels) of a crop, as ViTPose defines them."""

    center: np.ndarray
    scale: np.ndarray


def crop_for_box(box_xyxy, input_size: tuple[int, int]) -> CropBox:
    """The crop of an (x0, y0, x1, y1) box at the model's (width, height) aspect, padded 1.25x."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    box_width, box_height = x1 - x0, y1 - y0
    aspect = input_size[0] / input_size[1]
    if box_width > aspect * box_height:
        box_height = box_width / aspect
    elif box_width < aspect * box_height:
        box_width = box_height * aspect
    center = np.array([x0 + (x1 - x0) * 0.5, y0 + (y1 - y0) * 0.5], dtype=np.float32)
    scale = np.array([box_width / PIXEL_STD, box_height / PIXEL_STD], dtype=np.float32) * PADDING
    return CropBox(center, scale)


def warp_matrix(crop: CropBox, input_size: tuple[int, int], rotation: float = 0.0, flip: bool = False) -> np.ndarray:
    """2x3 matrix taking original pixels into the (width, height) model input."""
    width, height = input_size
    matrix = _unbiased_warp(rotation, crop.center * 2.0, np.array([width, height]) - 1.0, crop.scale * PIXEL_STD)
    if flip:
        mirror = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        matrix = (mirror @ np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    return matrix.astype(np.float32)


def _unbiased_warp(degrees: float, size_input: np.ndarray, size_dst: np.ndarray, size_target: np.ndarray) -> np.ndarray:
    """The unbiased (UDP) 2x3 warp from a region of ``size_target`` around ``size_input / 2``."""
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    scale_x, scale_y = size_dst[0] / size_target[0], size_dst[1] / size_target[1]
    return np.array([
        [cos * scale_x, -sin * scale_x,
         scale_x * (-0.5 * size_input[0] * cos + 0.5 * size_input[1] * sin + 0.5 * size_target[0])],
        [sin * scale_y, cos * scale_y,
         scale_y * (-0.5 * size_input[0] * sin - 0.5 * size_input[1] * cos + 0.5 * size_target[1])],
    ], dtype=np.float32)


def warp_image(image: np.ndarray, matrix: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """The crop as uint8 (H, W, 3); outside the image is black, as in the ViTPose processor."""
    return cv2.warpAffine(image, matrix, input_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def warp_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 matrix to (K, 2) points."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def sigma_for(heatmap_width: int) -> float:
    return max(1.0, BASE_SIGMA * heatmap_width / BASE_HEATMAP_WIDTH)


def kernel_for(heatmap_width: int) -> int:
    kernel = max(3, round(BASE_KERNEL * heatmap_width / BASE_HEATMAP_WIDTH))
    return kernel if kernel % 2 else kernel + 1


def encode_heatmaps(
    points: np.ndarray, labelled: np.ndarray, input_size: tuple[int, int], heatmap_wh: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian targets (K, H, W) for input-pixel points, and weights (1 labelled and inside, else 0)."""
    in_w, in_h = input_size
    out_w, out_h = heatmap_wh
    sigma = sigma_for(out_w)
    x = points[:, 0] * (out_w - 1) / (in_w - 1)
    y = points[:, 1] * (out_h - 1) / (in_h - 1)
    inside = (x >= -0.5) & (x <= out_w - 0.5) & (y >= -0.5) & (y <= out_h - 0.5)
    weights = (labelled > 0) & inside
    grid_x = np.arange(out_w, dtype=np.float32)[None, None, :]
    grid_y = np.arange(out_h, dtype=np.float32)[None, :, None]
    squared = (grid_x - x[:, None, None]) ** 2 + (grid_y - y[:, None, None]) ** 2
    heatmaps = np.exp(-squared / (2 * sigma**2)).astype(np.float32)
    heatmaps[~weights] = 0.0
    return heatmaps, weights.astype(np.float32)


def decode_heatmaps(processor, heatmaps: np.ndarray, crops: list[CropBox]) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, 2) points in original pixels and (N, K) scores, by the ViTPose processor's decoding."""
    heatmaps = np.array(heatmaps, dtype=np.float32)  # a copy: the refinement works in place
    centers = np.stack([crop.center for crop in crops])
    scales = np.stack([crop.scale for crop in crops])
    points, scores = processor.keypoints_from_heatmaps(heatmaps, centers, scales, kernel=kernel_for(heatmaps.shape[-1]))
    return points[..., :2], scores[..., 0]
