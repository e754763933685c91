"""Top-down keypoint estimation with ViTPose; the main metric is the mean pixel error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from visionlora.data.images import decode_records
from visionlora.data.pose import (
    PoseData,
    PoseRecord,
    flip_pairs,
    instance_box,
    keypoint_sigmas,
    mark_unlabelled,
    read_pose_data,
    reference_size,
)
from visionlora.data.topdown import (
    CropBox,
    crop_for_box,
    decode_heatmaps,
    encode_heatmaps,
    warp_image,
    warp_matrix,
    warp_points,
)
from visionlora.data.transforms import Normalizer
from visionlora.errors import VisionLoraError
from visionlora.metrics.pose import PoseTarget, pose_metrics
from visionlora.models import load_pretrained
from visionlora.tasks.base import Datasets, ModelInfo, Preset, dataset_behind
from visionlora.visualize import draw_keypoints

TINY_INPUT_HEIGHT = 64
PREDICT_BATCH = 16
CONTEXT = 1.5  # training crops are cached with this much context, for scale and rotation changes
SCALE_RANGE = (0.75, 1.25)
ROTATION_DEGREES = 30.0
ROTATION_PROBABILITY = 0.6


class PoseTask:
    """Fine-tune ViTPose on keypoint-labelled images (people or animals)."""

    name = "pose"
    preset = Preset(
        model="usyd-community/vitpose-base-simple",
        lora_r=16,
        lora_alpha=32,
        target_modules=("query", "value"),
        lr_lora=2e-4,
        lr_full=5e-5,
    )
    main_metric = "pixel_error"
    greater_is_better = False

    # -- data -------------------------------------------------------------------------
    def read_data(self, cfg) -> PoseData:
        return read_pose_data(cfg.data, cfg.val_data, cfg.seed, cfg.val_fraction)

    def make_datasets(self, source: PoseData, processor, info: ModelInfo, cfg) -> Datasets:
        """Crop every instance once; also records the skeleton and mean keypoints in ``info``."""
        input_size = tuple(info.extra["input_size"])
        train = decode_records(source.train, lambda im, rec: _training_crops(im, rec, input_size))
        val = decode_records(source.val, lambda im, rec: _eval_crops(im, rec, input_size))
        train_instances = [crop for crops in train.items for crop in crops]
        val_instances = [crop for crops in val.items for crop in crops]
        if not train_instances:
            raise VisionLoraError(f"{source.description['train']}: no readable training images with labelled keypoints")
        if not val_instances:
            raise VisionLoraError(f"{source.description['val']}: no readable validation images with labelled keypoints")
        normalizer = Normalizer(processor)
        heatmap_wh = tuple(info.extra["heatmap_size"])
        pairs = [tuple(p) for p in info.extra["flip_pairs"]]
        counts = {
            "train": len(train.items), "val": len(val.items),
            "train_instances": len(train_instances), "val_instances": len(val_instances),
            "labelled_keypoints_train": int(sum(c.keypoints[:, 2].sum() for c in train_instances)),
            "labelled_keypoints_val": int(sum(c.keypoints[:, 2].sum() for c in val_instances)),
        }
        mean_points = _mean_points(train_instances, input_size)
        info.extra.update(skeleton=source.skeleton, mean_points=mean_points.round(3).tolist())
        return Datasets(
            train=TrainingCrops(train_instances, normalizer, input_size, heatmap_wh, pairs, cfg.seed, cfg.augment),
            val=EvalCrops(val_instances, normalizer, input_size, heatmap_wh, mean_points),
            counts=counts,
            skipped=source.skipped + train.skipped + val.skipped,
            description=source.description,
        )

    def make_eval_dataset(self, data: str, processor, info: ModelInfo):
        """Labelled instances of ``data`` (all of it; a DeepLabCut project's validation frames)."""
        from visionlora.config import TrainConfig

        source = read_pose_data(data, None, TrainConfig().seed, None)
        if source.keypoint_names != info.labels:
            raise VisionLoraError(f"{data}: keypoints {source.keypoint_names} differ from the model's {info.labels}")
        records = source.val if source.description["format"] == "deeplabcut" else source.train + source.val
        input_size = tuple(info.extra["input_size"])
        decoded = decode_records(records, lambda im, rec: _eval_crops(im, rec, input_size))
        instances = [crop for crops in decoded.items for crop in crops]
        mean = np.asarray(info.extra["mean_points"]) if info.extra.get("mean_points") else None
        dataset = EvalCrops(instances, Normalizer(processor), input_size, tuple(info.extra["heatmap_size"]), mean)
        return dataset, source.skipped + decoded.skipped

    # -- model ------------------------------------------------------------------------
    def build_model(self, model_ref: str, labels: list[str], image_size: int | None):
        if model_ref == "tiny":
            model, processor = _tiny_vitpose(len(labels), image_size or TINY_INPUT_HEIGHT)
        else:
            from transformers import AutoModelForPoseEstimation

            model, processor = load_pretrained(AutoModelForPoseEstimation, model_ref, num_labels=len(labels))
            if image_size:
                width = round(image_size * 3 / 4 / 16) * 16
                processor.size = {"height": image_size, "width": width}
        input_size = (int(processor.size["width"]), int(processor.size["height"]))
        info = ModelInfo(
            task=self.name, mode="", base_model=model_ref, labels=list(labels),
            image_size={"height": input_size[1], "width": input_size[0]},
            extra={
                "input_size": list(input_size),
                "heatmap_size": list(_heatmap_size(model, input_size)),
                "flip_pairs": [list(p) for p in flip_pairs(labels)],
                "sigmas": keypoint_sigmas(labels),
                "skeleton": [],
            },
        )
        return model, processor, info

    def load_model(self, path: str, info: ModelInfo) -> torch.nn.Module:
        from transformers import AutoModelForPoseEstimation

        model, _ = load_pretrained(AutoModelForPoseEstimation, path, with_processor=False, num_labels=len(info.labels))
        return model

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        return ["head"]

    # -- steps ------------------------------------------------------------------------
    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in items[0]}

    def loss(self, model, batch, info: ModelInfo) -> torch.Tensor:
        heatmaps = model(pixel_values=batch["pixel_values"]).heatmaps
        return heatmap_loss(heatmaps, batch["target"], batch["weight"])

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator, info: ModelInfo) -> dict[str, Any]:
        model.eval()
        dataset = dataset_behind(loader, EvalCrops)
        losses, found = [], {}
        for batch in loader:
            heatmaps = model(pixel_values=batch["pixel_values"]).heatmaps.float()
            loss = heatmap_loss(heatmaps, batch["target"], batch["weight"])
            losses.append(accelerator.gather_for_metrics(loss.reshape(1)).mean())
            indices, heatmaps = accelerator.gather_for_metrics((batch["index"], heatmaps))
            for index, heatmap in zip(indices.tolist(), heatmaps.cpu().numpy()):
                found[index] = heatmap
        order = sorted(found)
        crops = [dataset.instances[i] for i in order]
        points, scores = decode_heatmaps(np.stack([found[i] for i in order]), [c.crop for c in crops])
        targets = [c.target() for c in crops]
        metrics = {"loss": float(torch.stack(losses).mean())}
        metrics.update(pose_metrics(targets, points, scores, info.labels, info.extra["sigmas"]))
        if dataset.mean_points is not None:
            baseline = np.stack([c.from_input(dataset.mean_points) for c in crops])
            truth = np.stack([c.keypoints for c in crops])
            labelled = truth[..., 2] > 0
            metrics["mean_baseline_pixel_error"] = float(np.linalg.norm(baseline - truth[..., :2], axis=-1)[labelled].mean())
        return metrics

    @torch.no_grad()
    def predict(self, model, processor, images: Sequence[Image.Image], info: ModelInfo, boxes=None, **_) -> list[dict]:
        """Keypoints per box (``boxes[i]``: x0, y0, x1, y1 lists for image i), or for the whole image."""
        model.eval()
        normalizer = Normalizer(processor)
        input_size = tuple(info.extra["input_size"])
        device = next(model.parameters()).device
        jobs = []
        for image_index, image in enumerate(images):
            image_boxes = (boxes[image_index] if boxes is not None else None) or [[0, 0, image.width, image.height]]
            array = np.asarray(image)
            for box in image_boxes:
                crop = crop_for_box(box, input_size)
                pixels = torch.from_numpy(warp_image(array, warp_matrix(crop, input_size), input_size)).permute(2, 0, 1)
                jobs.append((image_index, [float(v) for v in box], crop, normalizer(pixels)))
        results = [{"instances": []} for _ in images]
        for start in range(0, len(jobs), PREDICT_BATCH):
            chunk = jobs[start : start + PREDICT_BATCH]
            pixels = torch.stack([job[3] for job in chunk]).to(device)
            heatmaps = model(pixel_values=pixels).heatmaps.float().cpu().numpy()
            points, scores = decode_heatmaps(heatmaps, [job[2] for job in chunk])
            for (image_index, box, _, _), instance_points, instance_scores in zip(chunk, points, scores):
                results[image_index]["instances"].append({
                    "box": [round(v, 2) for v in box],
                    "keypoints": [
                        {"name": name, "x": round(float(x), 2), "y": round(float(y), 2), "score": float(s)}
                        for name, (x, y), s in zip(info.labels, instance_points, instance_scores)
                    ],
                })
        return results

    def draw(self, image: Image.Image, prediction: dict, info: ModelInfo) -> Image.Image:
        skeleton = info.extra.get("skeleton", [])
        for instance in prediction["instances"]:
            points = [(k["x"], k["y"]) for k in instance["keypoints"]]
            image = draw_keypoints(image, points, [k["score"] for k in instance["keypoints"]], skeleton)
        return image


def heatmap_loss(predicted: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean squared heatmap error, counting only labelled keypoints inside the crop (mmpose's form)."""
    squared = (predicted.float() - target.float()) ** 2 * weight[:, :, None, None].float()
    return 0.5 * squared.mean()


# -- crops and datasets ------------------------------------------------------------------
@dataclass
class InstanceCrop:
    """One instance: its pixels (a context crop for training, the model crop for evaluation)."""

    pixels: np.ndarray  # uint8 (H, W, 3)
    to_pixels: np.ndarray  # 2x3 matrix, original image -> ``pixels``
    crop: CropBox  # the model crop in the original image
    keypoints: np.ndarray  # (K, 3) in original pixels
    box: list[float]
    reference: float
    area: float

    def target(self) -> PoseTarget:
        return PoseTarget(self.keypoints, self.box, self.reference, self.area)

    def from_input(self, points: np.ndarray) -> np.ndarray:
        """Model-input points mapped back to original pixels."""
        inverse = cv2.invertAffineTransform(self.to_pixels)
        return warp_points(points, inverse)


def _instances(image: Image.Image, record: PoseRecord):
    width, height = image.size
    for instance in record.instances:
        keypoints = mark_unlabelled(instance.keypoints, width, height)
        if keypoints[:, 2].any():
            box = instance_box(record, instance, width, height)
            area = instance.area or (box[2] - box[0]) * (box[3] - box[1])
            yield keypoints, box, reference_size(instance), float(area)


def _training_crops(image: Image.Image, record: PoseRecord, input_size) -> list[InstanceCrop]:
    """Each instance cut out with CONTEXT times the model crop, so augmentation has room."""
    array = np.asarray(image)
    context_size = (round(input_size[0] * CONTEXT), round(input_size[1] * CONTEXT))
    crops = []
    for keypoints, box, reference, area in _instances(image, record):
        crop = crop_for_box(box, input_size)
        matrix = warp_matrix(CropBox(crop.center, crop.scale * CONTEXT), context_size)
        crops.append(InstanceCrop(warp_image(array, matrix, context_size), matrix, crop, keypoints, box, reference, area))
    return crops


def _eval_crops(image: Image.Image, record: PoseRecord, input_size) -> list[InstanceCrop]:
    """Each instance cut out exactly as the model sees it."""
    array = np.asarray(image)
    crops = []
    for keypoints, box, reference, area in _instances(image, record):
        crop = crop_for_box(box, input_size)
        matrix = warp_matrix(crop, input_size)
        crops.append(InstanceCrop(warp_image(array, matrix, input_size), matrix, crop, keypoints, box, reference, area))
    return crops


def _mean_points(instances: list[InstanceCrop], input_size) -> np.ndarray:
    """Each keypoint's mean position in the model input over the training instances (a baseline)."""
    totals = np.zeros((len(instances[0].keypoints), 2))
    counts = np.zeros((len(instances[0].keypoints), 1))
    for instance in instances:
        points = warp_points(instance.keypoints[:, :2], warp_matrix(instance.crop, input_size))
        labelled = instance.keypoints[:, 2:3] > 0
        totals += points * labelled
        counts += labelled
    return totals / np.maximum(counts, 1)


class EvalCrops(torch.utils.data.Dataset):
    """Model-ready crops with target heatmaps (for the validation loss)."""

    def __init__(self, instances, normalizer, input_size, heatmap_wh, mean_points=None):
        self.instances, self.normalizer = instances, normalizer
        self.input_size, self.heatmap_wh, self.mean_points = input_size, heatmap_wh, mean_points

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> dict[str, Any]:
        instance = self.instances[index]
        points = warp_points(instance.keypoints[:, :2], instance.to_pixels)
        return _item(instance.pixels, points, instance.keypoints[:, 2], self, index)


class TrainingCrops(EvalCrops):
    """Random scale, rotation and flip (swapping left/right keypoints) from the cached context.

    The augmentation of item ``i`` in epoch ``e`` depends only on (seed, e, i).
    """

    def __init__(self, instances, normalizer, input_size, heatmap_wh, pairs, seed: int, augment: bool = True):
        super().__init__(instances, normalizer, input_size, heatmap_wh)
        self.pairs, self.seed, self.augment, self.epoch = pairs, seed, augment, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        instance = self.instances[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        scale, rotation, flip = 1.0, 0.0, False
        if self.augment:
            scale = rng.uniform(*SCALE_RANGE)
            rotation = rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES) if rng.random() < ROTATION_PROBABILITY else 0.0
            flip = bool(rng.random() < 0.5)
        crop = CropBox(instance.crop.center, instance.crop.scale * scale)
        to_input = warp_matrix(crop, self.input_size, rotation, flip)
        from_context = cv2.invertAffineTransform(instance.to_pixels)
        context_to_input = _compose(to_input, from_context)
        pixels = warp_image(instance.pixels, context_to_input, self.input_size)
        points = warp_points(instance.keypoints[:, :2], to_input)
        labelled = instance.keypoints[:, 2].copy()
        if flip:
            for left, right in self.pairs:
                points[[left, right]] = points[[right, left]]
                labelled[[left, right]] = labelled[[right, left]]
        return _item(pixels, points, labelled, self, index)


def _item(pixels: np.ndarray, points: np.ndarray, labelled: np.ndarray, dataset: EvalCrops, index: int) -> dict[str, Any]:
    target, weight = encode_heatmaps(points, labelled, dataset.input_size, dataset.heatmap_wh)
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
    return {
        "pixel_values": dataset.normalizer(tensor),
        "target": torch.from_numpy(target),
        "weight": torch.from_numpy(weight),
        "index": torch.tensor(index),
    }


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 matrix applying ``inner`` then ``outer``."""
    full = np.vstack([outer, [0.0, 0.0, 1.0]]) @ np.vstack([inner, [0.0, 0.0, 1.0]])
    return full[:2].astype(np.float32)


def _heatmap_size(model, input_size) -> tuple[int, int]:
    """ViTPose heatmaps are the patch grid upsampled by the decoder's scale factor (4)."""
    backbone = model.config.backbone_config
    patch = backbone.patch_size if isinstance(backbone.patch_size, (list, tuple)) else [backbone.patch_size] * 2
    factor = getattr(model.config, "scale_factor", 4)
    return input_size[0] // patch[1] * factor, input_size[1] // patch[0] * factor


def _tiny_vitpose(num_keypoints: int, height: int):
    """A 2-layer, 64-wide ViTPose with 8-pixel patches and random weights, input height x 3/4 height."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessorPil

    width = round(height * 3 / 4 / 8) * 8
    if height % 8 or width < 8:
        raise VisionLoraError(f"--image-size {height}: the tiny ViTPose needs a multiple of 8 (16 or more)")
    backbone = VitPoseBackboneConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=[height, width], patch_size=[8, 8], out_indices=[2],
    )
    processor = VitPoseImageProcessorPil(size={"height": height, "width": width})
    return VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=num_keypoints)), processor
