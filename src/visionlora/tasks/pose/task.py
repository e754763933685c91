"""Top-down keypoint estimation with ViTPose; the main metric is the mean pixel error."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from visionlora.core.drawing import draw_keypoints
from visionlora.core.outputs import DRAWN_IMAGES, JSON_OUTPUT, Option, pixel_box
from visionlora.data.cache import CachePlan, StoredImages
from visionlora.data.images import decode_records
from visionlora.data.records import PoseRecord, SourceData, mark_unlabelled
from visionlora.data.transforms import Normalizer, chw
from visionlora.errors import VisionLoraError
from visionlora.metrics.pose import PCK_CURVE, PoseTarget, keypoint_table, pose_metrics
from visionlora.modeling.builtin import BuiltinModel
from visionlora.tasks.base import (
    DemoRecipe,
    Diagnostics,
    LabelIssue,
    ModelFacts,
    ModelInfo,
    PredictInput,
    Preset,
    SeededDataset,
    Task,
    TaskState,
)
from visionlora.tasks.pose.deeplabcut_output import DLC_CSV, DLC_H5
from visionlora.tasks.pose.geometry import (
    CropBox,
    crop_for_box,
    decode_heatmaps,
    encode_heatmaps,
    warp_image,
    warp_matrix,
    warp_points,
)
from visionlora.tasks.pose.keypoints import flip_pairs, instance_box, keypoint_sigmas, reference_size
from visionlora.tasks.pose.plots import keypoint_error_plot, pck_curve_plot
from visionlora.tasks.pose.prelabels import LABEL_FORMATS
from visionlora.tasks.pose.topdown import DETECTOR_OPTIONS, DetectorRequest
from visionlora.tasks.records import task_state
from visionlora.tasks.roles import TaskData, TaskModel, TaskPrediction, TaskReport, TaskSteps

CONTEXT = 1.5  # training crops are cached with this much context, for scale and rotation changes
SCALE_RANGE = (0.75, 1.25)
ROTATION_DEGREES = 30.0
ROTATION_PROBABILITY = 0.6


def read_boxes_file(text: str) -> dict[str, list[list[float]]]:
    """A JSON file mapping image paths (or file names) to lists of [x0, y0, x1, y1] boxes."""
    path = Path(text)
    try:
        mapping = json.loads(path.read_text())
    except FileNotFoundError:
        raise VisionLoraError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise VisionLoraError(f"{path}: not valid JSON") from None
    if not isinstance(mapping, dict):
        raise VisionLoraError(f"{path}: expected a mapping of image file to a list of [x0, y0, x1, y1] boxes")
    for name, boxes in mapping.items():
        check_boxes(boxes, f"{path}: boxes for {name}")
    return mapping


def parse_boxes_field(text: str) -> Any:
    """A form field: a JSON list of [x0, y0, x1, y1] boxes, or a mapping of file name to such lists."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise VisionLoraError("boxes must be JSON: a list of [x0, y0, x1, y1] boxes") from None
    if isinstance(value, dict):
        return {name: check_boxes(boxes, f"boxes for {name}") for name, boxes in value.items()}
    return check_boxes(value, "boxes")


def check_boxes(boxes: Any, where: str) -> list[list[float]]:
    """``boxes`` if it is a list of [x0, y0, x1, y1] number lists, else a clear error."""
    if not (isinstance(boxes, list) and all(
        isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b) for b in boxes
    )):
        raise VisionLoraError(f"{where} must be a list of [x0, y0, x1, y1]")
    return boxes


@dataclass
class PoseState(TaskState):
    """A pose run's own facts: the crop and heatmap sizes, which keypoints swap in a flip, their
    OKS sigmas, the skeleton drawn between them, and the mean keypoints of the training crops."""

    input_size: list[int] = field(default_factory=list)  # (width, height) of the model input
    heatmap_size: list[int] = field(default_factory=list)  # (width, height)
    flip_pairs: list[list[int]] = field(default_factory=list)
    sigmas: list[float] = field(default_factory=list)
    skeleton: list[list[int]] = field(default_factory=list)
    mean_points: list[list[float]] | None = None


def pose_state(info: ModelInfo) -> PoseState:
    return task_state(info, PoseState)


class PoseData(TaskData):
    def check_record(self, record: PoseRecord, image_size: tuple[int, int], labels: list[str]) -> list[str]:
        """Labelled keypoints outside the image (as decoded), and instances with no keypoint labelled."""
        width, height = image_size
        problems = []
        for number, instance in enumerate(record.instances, 1):
            points = np.asarray(instance.keypoints, dtype=np.float64)
            labelled = points[:, 2] > 0
            if not labelled.any():
                problems.append(f"instance {number}: every keypoint is unlabelled or invisible")
                continue
            outside = labelled & ((points[:, 0] < 0) | (points[:, 1] < 0) | (points[:, 0] >= width)
                                  | (points[:, 1] >= height))
            for index in np.flatnonzero(outside):
                name = labels[index] if index < len(labels) else f"keypoint {index}"
                problems.append(f"instance {number}: {name} at ({points[index, 0]:g}, {points[index, 1]:g}) lies "
                                f"outside the {width}x{height} image")
        return problems

    def state_from_data(self, source: SourceData, info: ModelInfo, cfg) -> PoseState:
        """The skeleton the annotations draw between keypoints."""
        return dataclasses.replace(pose_state(info), skeleton=source.extra.get("skeleton", []))

    def train_dataset(self, source: SourceData, processor, info: ModelInfo, cfg, cache: CachePlan):
        """Every instance cut out once with context."""
        state = pose_state(info)
        input_size = tuple(state.input_size)
        decoded = decode_records(source.train, lambda im, rec: _training_crops(im, rec, input_size), cache=cache,
                                 settings=f"pose-train|{input_size}|{CONTEXT}")
        pairs = [tuple(p) for p in state.flip_pairs]
        dataset = TrainingCrops(Crops(decoded.items), input_size, tuple(state.heatmap_size), pairs, cfg.seed,
                                cfg.augment)
        dataset.cache_report = decoded.report
        return dataset, decoded.skipped

    def state_from_training_set(self, train, info: ModelInfo, cfg) -> PoseState:
        """The mean keypoint positions in the input (the baseline the metrics compare against)."""
        state = pose_state(info)
        if not len(train):
            return state
        mean_points = _mean_points(train.instances, tuple(state.input_size)).round(3).tolist()
        return dataclasses.replace(state, mean_points=mean_points)

    def eval_dataset(self, records: list[PoseRecord], processor, info: ModelInfo, cache: CachePlan | None = None):
        state = pose_state(info)
        input_size = tuple(state.input_size)
        decoded = decode_records(records, lambda im, rec: _eval_crops(im, rec, input_size), cache=cache,
                                 settings=f"pose-eval|{input_size}")
        mean = np.asarray(state.mean_points) if state.mean_points else None
        dataset = EvalCrops(Crops(decoded.items), input_size, tuple(state.heatmap_size), mean)
        dataset.cache_report = decoded.report
        return dataset, decoded.skipped

    def image_bytes(self, processor, info: ModelInfo) -> int:
        width, height = pose_state(info).input_size
        return int(width * height * 3 * CONTEXT**2)

    def count(self, dataset, split: str, info: ModelInfo) -> dict[str, Any]:
        return {
            split: len(dataset.crops.images),
            f"{split}_instances": len(dataset),
            f"labelled_keypoints_{split}": int(sum(c.keypoints[:, 2].sum() for c in dataset.instances)),
        }


class PoseModel(TaskModel):
    def load_kwargs(self, ref: str, labels: list[str]) -> dict[str, Any]:
        return {"num_labels": len(labels)}

    def resize_processor(self, processor, image_size: int) -> None:
        """ViTPose inputs keep their 4:3 shape: ``image_size`` high, 3/4 of it wide (16-pixel steps)."""
        processor.size = {"height": image_size, "width": round(image_size * 3 / 4 / 16) * 16}

    def describe_model(self, model, processor, labels: list[str]) -> ModelFacts:
        input_size = (int(processor.size["width"]), int(processor.size["height"]))
        return ModelFacts(state=PoseState(
            input_size=list(input_size),
            heatmap_size=list(_heatmap_size(model, input_size)),
            flip_pairs=[list(p) for p in flip_pairs(labels)],
            sigmas=keypoint_sigmas(labels),
        ))

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        return ["head"]


class PoseSteps(TaskSteps):
    def forward(self, model, batch, info: ModelInfo):
        return model(pixel_values=batch["pixel_values"])

    def loss_of_outputs(self, outputs, batch, info: ModelInfo) -> torch.Tensor:
        return heatmap_loss(outputs.heatmaps, batch["target"], batch["weight"])

    def eval_step(self, model, batch, processor, info: ModelInfo):
        heatmaps = model(pixel_values=batch["pixel_values"]).heatmaps.float()
        loss = heatmap_loss(heatmaps, batch["target"], batch["weight"])
        crops = [CropBox(c.numpy(), s.numpy()) for c, s in zip(batch["center"].cpu(), batch["scale"].cpu())]
        points, scores = decode_heatmaps(processor, heatmaps.cpu().numpy(), crops)
        return loss, list(zip(points, scores))

    def top1(self, output: torch.Tensor) -> torch.Tensor:
        """The peak cell of each keypoint's heatmap (heatmaps are (N, keypoints, H, W))."""
        return output.flatten(2).argmax(dim=-1)

    def metrics(self, dataset, indices, outputs, info: ModelInfo) -> dict[str, Any]:
        crops = [dataset.instances[i] for i in indices]
        points = np.stack([o[0] for o in outputs])
        scores = np.stack([o[1] for o in outputs])
        metrics = pose_metrics([c.target() for c in crops], points, scores, info.labels, pose_state(info).sigmas)
        if dataset.mean_points is not None:
            baseline = np.stack([c.from_input(dataset.mean_points) for c in crops])
            truth = np.stack([c.keypoints for c in crops])
            labelled = truth[..., 2] > 0
            metrics["mean_baseline_pixel_error"] = float(
                np.linalg.norm(baseline - truth[..., :2], axis=-1)[labelled].mean())
        return metrics


class PosePrediction(TaskPrediction):
    def hugging_face_answer(self, prediction, info: ModelInfo) -> list[dict[str, Any]]:
        """No Hugging Face task: in the detection answer's spirit, one item per instance,
        ``{"box": {...}, "keypoints": [{"label", "x", "y", "score"}, ...]}``."""
        return [{"box": pixel_box(instance["box"]),
                 "keypoints": [{"label": k["name"], "x": k["x"], "y": k["y"], "score": k["score"]}
                               for k in instance["keypoints"]]}
                for instance in prediction["instances"]]

    def box_request(self, values: dict[str, Any]) -> DetectorRequest | None:
        return DetectorRequest.from_options(values)

    def predict_inputs(self, image, image_index, processor, info, options):
        """One input per box (``boxes[i]``: x0, y0, x1, y1 lists for image i), or the whole image;
        a detector's boxes come with their scores (``box_scores[i]``)."""
        input_size = tuple(pose_state(info).input_size)
        boxes, box_scores = options.get("boxes"), options.get("box_scores")
        image_boxes = boxes[image_index] if boxes is not None else None
        if image_boxes is None:  # no boxes given for this image: the whole image is one instance
            image_boxes = [[0, 0, image.width, image.height]]
        image_scores = box_scores[image_index] if box_scores is not None else [None] * len(image_boxes)
        normalizer = Normalizer(processor)
        array = np.asarray(image)
        inputs = []
        for box, box_score in zip(image_boxes, image_scores):
            crop = crop_for_box(box, input_size)
            pixels = torch.from_numpy(warp_image(array, warp_matrix(crop, input_size), input_size)).permute(2, 0, 1)
            inputs.append(PredictInput(image_index, normalizer(pixels), ([float(v) for v in box], crop, box_score)))
        return inputs

    def decode(self, outputs, inputs, images, processor, info: ModelInfo, options) -> list[dict]:
        """Each instance's box, keypoints and score: its detector box's score, or without a
        detector the mean of its keypoints' scores (what a tracker ranks instances by)."""
        heatmaps = outputs.heatmaps.float().cpu().numpy()
        points, scores = decode_heatmaps(processor, heatmaps, [item.meta[1] for item in inputs])
        return [
            {
                "box": [round(v, 2) for v in item.meta[0]],
                "score": float(item.meta[2] if item.meta[2] is not None else np.mean(instance_scores)),
                "keypoints": [
                    {"name": name, "x": round(float(x), 2), "y": round(float(y), 2), "score": float(s)}
                    for name, (x, y), s in zip(info.labels, instance_points, instance_scores)
                ],
            }
            for item, instance_points, instance_scores in zip(inputs, points, scores)
        ]

    def combine(self, results: list[dict]) -> dict[str, Any]:
        return {"instances": results}

    def draw(self, image: Image.Image, prediction: dict, info: ModelInfo) -> Image.Image:
        skeleton = pose_state(info).skeleton
        for instance in prediction["instances"]:
            points = [(k["x"], k["y"]) for k in instance["keypoints"]]
            image = draw_keypoints(image, points, [k["score"] for k in instance["keypoints"]], skeleton)
        return image

    def tracked(self, prediction: dict) -> list[dict]:
        """Each instance by its box (the detector's, with ``--detector``)."""
        return prediction["instances"]

    def uncertainty(self, prediction: dict) -> float:
        """One minus the mean keypoint score (heatmap peaks, clipped to [0, 1]); 1 without an instance."""
        scores = [min(max(float(k["score"]), 0.0), 1.0) for i in prediction["instances"] for k in i["keypoints"]]
        return 1.0 - sum(scores) / len(scores) if scores else 1.0


class PoseReport(TaskReport):
    def diagnostics(self, dataset, indices, outputs, info: ModelInfo) -> Diagnostics:
        targets = [dataset.instances[i].target() for i in indices]
        rows, curve = keypoint_table(targets, np.stack([o[0] for o in outputs]), info.labels)
        return Diagnostics(rows, {
            "keypoint_errors.png": keypoint_error_plot(info.labels, [row["pixel_error"] for row in rows]),
            "pck_curve.png": pck_curve_plot(PCK_CURVE, curve),
        })

    def ground_truth(self, record: PoseRecord, image: Image.Image, info: ModelInfo):
        """The labelled instances, and their boxes as the ``boxes`` option (top-down on the same boxes)."""
        instances, boxes = [], []
        for keypoints, box, _, _ in _instances(image, record):
            boxes.append(box)
            instances.append({"box": box, "keypoints": [
                {"name": name, "x": float(x), "y": float(y), "score": 1.0 if labelled > 0 else -1.0}  # -1: not drawn
                for name, (x, y, labelled) in zip(info.labels, keypoints)]})
        return {"instances": instances}, {"boxes": [boxes]}

    def label_issues(self, records: list[PoseRecord], predictions: list[dict[str, Any]],
                     info: ModelInfo) -> list[LabelIssue]:
        """Each labelled keypoint's distance to the out-of-sample prediction in the same box, over the box's
        diagonal (DeepLabCut's outliers in spirit): an image whose worst keypoint is over OUTLIER_SHARE of its
        instance's size away is flagged; the score is 1 minus that share."""
        issues = []
        for record, prediction in zip(records, predictions):
            worst, message = 0.0, "every keypoint near its prediction"
            for instance, found in zip(record.instances, prediction["instances"]):
                share, text = _worst_keypoint(instance.keypoints, found, info.labels)
                if share > worst:
                    worst, message = share, text
            issues.append(LabelIssue(1.0 - worst, worst > OUTLIER_SHARE, message))
        return issues


class PoseTask(Task):
    """Fine-tune ViTPose on keypoint-labelled images (people or animals)."""

    name = "pose"
    data_formats = ("deeplabcut", "coco-keypoints")
    preset = Preset(
        model="usyd-community/vitpose-base-simple",
        lora_r=16,
        lora_alpha=32,
        target_modules=("query", "value"),
        lr_lora=2e-4,
        lr_full=5e-5,
    )
    builtin_models = (BuiltinModel("tiny", 64, "visionlora.tasks.pose.builtin:tiny_vitpose"),)
    demo = DemoRecipe("lizards: the walker twin's 11 keypoints in a new layout, COCO keypoints, 80 train / 20 val",
                      "visionlora.examples.procedural:write_lizards", {"n_train": 80, "n_val": 20},
                      model="tiny-pretrained", epochs=80, settings={"lora": {"lr": 3e-3}, "full": {"lr": 1e-3}})
    main_metric = "pixel_error"
    greater_is_better = False
    auto_class = "AutoModelForPoseEstimation"
    pipeline_tag = "keypoint-detection"
    card_does = "locates, in each instance box, the keypoints"
    fixed_labels = True
    label_noun = "keypoints"
    output_names = ("heatmaps",)
    unbounded_metrics = ("pixel_error", "mean_baseline_pixel_error")
    predict_options = (
        Option("boxes", 'boxes per image: a JSON file {"image.jpg": [[x0, y0, x1, y1], ...]} '
               "(default: the whole image; an empty list: no instance)", read_boxes_file, None, "FILE.json",
               per_image=True, parse_form=parse_boxes_field),
    )
    writers = (JSON_OUTPUT, DRAWN_IMAGES, DLC_CSV, DLC_H5)
    label_formats = LABEL_FORMATS
    box_options = DETECTOR_OPTIONS
    state_type = PoseState
    data_role = PoseData
    model_role = PoseModel
    steps_role = PoseSteps
    prediction_role = PosePrediction
    report_role = PoseReport


OUTLIER_SHARE = 0.2  # a keypoint further than this share of its instance's box diagonal from the prediction


def _worst_keypoint(keypoints: np.ndarray, found: dict[str, Any], names: list[str]) -> tuple[float, str]:
    """(distance over the box diagonal, a description) of an instance's labelled keypoint furthest from its
    prediction."""
    x0, y0, x1, y1 = found["box"]
    diagonal = max(float(np.hypot(x1 - x0, y1 - y0)), 1.0)
    worst, text = 0.0, ""
    for (x, y, labelled), predicted, name in zip(np.asarray(keypoints), found["keypoints"], names):
        if labelled <= 0:
            continue
        distance = float(np.hypot(x - predicted["x"], y - predicted["y"]))
        if distance / diagonal > worst:
            worst = distance / diagonal
            text = (f"{name} labelled at ({x:.0f}, {y:.0f}), predicted at ({predicted['x']:.0f}, "
                    f"{predicted['y']:.0f}) by a model that never saw it: {distance:.0f} px apart, "
                    f"{worst:.2f} of the instance's size")
    return worst, text


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
    """(keypoints, box, reference size, area) of each instance with a labelled keypoint."""
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
        crops.append(InstanceCrop(warp_image(array, matrix, context_size), matrix, crop, keypoints, box, reference,
                                  area))
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


class Crops:
    """The instances of the decoded images, one after another: ``instances[i]`` without pixels
    (known without reading them), ``pixels(i)`` read from the image store."""

    def __init__(self, images: StoredImages):
        self.images = images
        self.positions = [(i, k) for i in range(len(images)) for k in range(len(images.meta(i)))]
        self.instances = [images.meta(i)[k] for i, k in self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def pixels(self, index: int) -> np.ndarray:
        image, crop = self.positions[index]
        return self.images[image][crop].pixels


class EvalCrops(SeededDataset):
    """Model-ready crops with target heatmaps (for the validation loss) and their crop boxes."""

    def __init__(self, crops: Crops, input_size, heatmap_wh, mean_points=None):
        self.crops, self.instances = crops, crops.instances
        self.input_size, self.heatmap_wh, self.mean_points = input_size, heatmap_wh, mean_points

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> dict[str, Any]:
        instance = self.instances[index]
        points = warp_points(instance.keypoints[:, :2], instance.to_pixels)
        return _item(self.crops.pixels(index), points, instance.keypoints[:, 2], self, index)


class TrainingCrops(EvalCrops):
    """Random scale, rotation and flip (swapping left/right keypoints) from the cached context."""

    def __init__(self, crops: Crops, input_size, heatmap_wh, pairs, seed: int, augment: bool = True):
        super().__init__(crops, input_size, heatmap_wh)
        self.pairs, self.seed, self.augment = pairs, seed, augment

    def __getitem__(self, index: int) -> dict[str, Any]:
        instance = self.instances[index]
        rng = np.random.default_rng(self.item_seed(index))
        scale, rotation, flip = 1.0, 0.0, False
        if self.augment:
            scale = rng.uniform(*SCALE_RANGE)
            rotation = rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES) if rng.random() < ROTATION_PROBABILITY else 0.0
            flip = bool(rng.random() < 0.5)
        crop = CropBox(instance.crop.center, instance.crop.scale * scale)
        to_input = warp_matrix(crop, self.input_size, rotation, flip)
        from_context = cv2.invertAffineTransform(instance.to_pixels)
        context_to_input = _compose(to_input, from_context)
        pixels = warp_image(self.crops.pixels(index), context_to_input, self.input_size)
        points = warp_points(instance.keypoints[:, :2], to_input)
        labelled = instance.keypoints[:, 2].copy()
        if flip:
            for left, right in self.pairs:
                points[[left, right]] = points[[right, left]]
                labelled[[left, right]] = labelled[[right, left]]
        return _item(pixels, points, labelled, self, index)


def _item(pixels: np.ndarray, points: np.ndarray, labelled: np.ndarray, dataset: EvalCrops,
          index: int) -> dict[str, Any]:
    target, weight = encode_heatmaps(points, labelled, dataset.input_size, dataset.heatmap_wh)
    crop = dataset.instances[index].crop
    return {
        "pixel_values": chw(pixels),
        "target": torch.from_numpy(target),
        "weight": torch.from_numpy(weight),
        "center": torch.from_numpy(np.asarray(crop.center, dtype=np.float32)),
        "scale": torch.from_numpy(np.asarray(crop.scale, dtype=np.float32)),
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
