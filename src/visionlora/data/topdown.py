"""Top-down keypoint geometry: crop a box to the model input, encode heatmaps, decode them back.

The crop follows transformers' ViTPose image processor exactly (box -> centre and scale
with 1.25 padding, unbiased warp matrix), so a model trained here also works with
``VitPoseImageProcessor``; decoding uses its DARK sub-pixel refinement and maps the
points back to original image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from transformers.models.vitpose.image_processing_pil_vitpose import (
    box_to_center_and_scale,
    get_keypoint_predictions,
    get_warp_matrix,
    post_dark_unbiased_data_processing,
    transform_preds,
)

# Heatmap Gaussian width and DARK kernel for 64x48 heatmaps; scaled with the heatmap width.
BASE_HEATMAP_WIDTH = 48
BASE_SIGMA = 2.0
BASE_KERNEL = 11


@dataclass(frozen=True)
class CropBox:
    """Centre (x, y) and scale (w, h, in units of 200 pixels) of a crop, as ViTPose defines them."""

    center: np.ndarray
    scale: np.ndarray


def crop_for_box(box_xyxy, input_size: tuple[int, int]) -> CropBox:
    """The crop of an (x0, y0, x1, y1) box at the model's (width, height) aspect, padded 1.25x."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    width, height = input_size
    center, scale = box_to_center_and_scale([x0, y0, x1 - x0, y1 - y0], image_width=width, image_height=height)
    return CropBox(center, scale)


def warp_matrix(crop: CropBox, input_size: tuple[int, int], rotation: float = 0.0, flip: bool = False) -> np.ndarray:
    """2x3 matrix taking original pixels into the (width, height) model input."""
    width, height = input_size
    matrix = get_warp_matrix(rotation, crop.center * 2.0, np.array([width, height]) - 1.0, crop.scale * 200.0)
    if flip:
        mirror = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        matrix = (mirror @ np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    return matrix.astype(np.float32)


def warp_image(image: np.ndarray, matrix: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """The crop as uint8 (H, W, 3); outside the image is black, as in the ViTPose processor."""
    return cv2.warpAffine(image, matrix, input_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def warp_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 matrix to (K, 2) points."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def heatmap_size(input_size: tuple[int, int], model_scale: int) -> tuple[int, int]:
    """(width, height) of the heatmaps for a model whose output is input / model_scale."""
    return input_size[0] // model_scale, input_size[1] // model_scale


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


def decode_heatmaps(heatmaps: np.ndarray, crops: list[CropBox]) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, 2) points in original pixels and (N, K) scores, with DARK sub-pixel refinement."""
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    _, _, height, width = heatmaps.shape
    coords, scores = get_keypoint_predictions(heatmaps)
    coords = post_dark_unbiased_data_processing(coords.copy(), heatmaps.copy(), kernel=kernel_for(width))
    points = np.stack([
        transform_preds(coords[i], center=crop.center, scale=crop.scale, output_size=[height, width])
        for i, crop in enumerate(crops)
    ])
    return points[..., :2], scores[..., 0]
