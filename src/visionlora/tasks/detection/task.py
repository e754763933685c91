"""Object detection: DETR by default, any transformers object-detection model; COCO mAP."""

from __future__ import annotations

import contextlib
import io
import math
import re
from functools import partial
from typing import Any, Sequence, cast

import albumentations as A
import numpy as np
import torch
from PIL import Image
from transformers.image_transforms import corners_to_center_format

from visionlora.core.drawing import draw_boxes
from visionlora.core.outputs import Option, parse_float_between, pixel_box
from visionlora.data.batches import batch_buffer, stacked
from visionlora.data.cache import CachePlan, StoredImages, default_cache_dir
from visionlora.data.images import decode_records
from visionlora.data.records import DetectionRecord, Part, SourceData, clean_box
from visionlora.data.transforms import Normalizer, chw, processor_pixels
from visionlora.errors import VisionLoraError
from visionlora.metrics.detection import ImageBoxes, detection_curves, detection_metrics
from visionlora.modeling.builtin import BuiltinModel
from visionlora.tasks.base import (
    DemoRecipe,
    Diagnostics,
    LabelIssue,
    ModelInfo,
    PredictInput,
    Preset,
    SeededDataset,
    Task,
)
from visionlora.tasks.detection.plots import precision_recall_plot
from visionlora.tasks.detection.prelabels import LABEL_FORMATS
from visionlora.tasks.detection.timm_backbones import (
    check_backbone_loaded,
    is_converted,
    needs_conversion,
    timm_free_checkpoint,
    train_like_timm,
)
from visionlora.tasks.roles import TaskData, TaskModel, TaskPrediction, TaskReport, TaskSteps

# Module names of detection heads across DETR-family models (class and box predictors).
HEAD_PATTERN = re.compile(
    r"(^|\.)(class_labels_classifier|bbox_predictor|class_embed|bbox_embed|enc_score_head|enc_bbox_head|denoising_class_embed)$"
)
REPEAT_THRESHOLD = 0.3  # categories in fewer than this share of the images are repeated
# Model types whose heads are tied by default (peft cannot wrap tied heads).
TIED_HEAD_TYPES = ("rt_detr", "d_fine", "deimv2")


class DetectionData(TaskData):
    def record_classes(self, record: DetectionRecord) -> list[str]:
        return list(record.labels)

    def check_record(self, record: DetectionRecord, image_size: tuple[int, int], labels: list[str]) -> list[str]:
        """Zero-area boxes, boxes reaching outside the image (as decoded), labels not among the categories."""
        problems = []
        for box, label in zip(record.boxes, record.labels):
            shown = "[" + ", ".join(f"{v:g}" for v in box) + f"] ({label})"
            problem = box_problem(box, image_size)
            if problem:
                problems.append(f"box {shown} {problem}")
            if label not in labels:
                problems.append(f"box {shown}: category {label!r} is not among {', '.join(labels)}")
        return problems

    def check_data(self, source: SourceData, held_out: list[Part], where: str) -> None:
        """Categories of every part, and boxes in training and validation (mAP needs validation boxes)."""
        source.labels = list(dict.fromkeys(source.labels + [n for part in held_out for n in part.labels]))
        if not source.labels:
            raise VisionLoraError(f"{where}: the annotations define no categories")
        super().check_data(source, held_out, where)
        if not any(r.boxes for r in source.train):
            raise VisionLoraError(f"{source.description['train']}: no boxes in the training images")
        if not any(r.boxes for r in source.val):
            raise VisionLoraError(f"{source.description['val']}: no boxes in the validation images, "
                                  "so mAP is undefined")

    def make_datasets(self, source: SourceData, processor, info: ModelInfo, cfg):
        """Also counts and lists the boxes dropped while reading and fitting them to the images."""
        data = super().make_datasets(source, processor, info, cfg)
        train, val = cast(DetectionImages, data.train), cast(DetectionImages, data.val)
        dropped = source.dropped + train.dropped + val.dropped
        data.counts["dropped_boxes"] = len(dropped)
        data.description["dropped_boxes"] = dropped
        return data

    def train_dataset(self, source: SourceData, processor, info: ModelInfo, cfg, cache: CachePlan):
        kind = AugmentedDetection if cfg.augment else DetectionImages
        return _decoded_dataset(kind, source.train, processor, info, cache, cfg.seed)

    def eval_dataset(self, records: list[DetectionRecord], processor, info: ModelInfo, cache: CachePlan | None = None):
        return _decoded_dataset(DetectionImages, records, processor, info, cache)

    def image_bytes(self, processor, info: ModelInfo) -> int:
        """Shortest/longest-edge resizes are costed at their largest (a longest x longest square)."""
        size = processor.size
        longest = size.get("longest_edge") or max(size.get("height", 0), size.get("width", 0),
                                                  size.get("shortest_edge", 0))
        return int(longest) ** 2 * 3

    def sample_weights(self, dataset) -> list[float]:
        """Repeat-factor sampling (LVIS): an image is drawn in proportion to max(1, sqrt(t / f(c)))
        over its categories c, where f(c) is the share of images holding c and t is REPEAT_THRESHOLD."""
        images = [set(record.labels) for record in dataset.records]
        share = {c: sum(c in labels for labels in images) / len(images) for c in set().union(*images)}
        return [max([1.0] + [math.sqrt(REPEAT_THRESHOLD / share[c]) for c in labels]) for labels in images]

    def count(self, dataset, split: str, info: ModelInfo) -> dict[str, Any]:
        counts = {split: len(dataset), f"{split}_boxes": sum(len(r.boxes) for r in dataset.records)}
        if split == "train":
            counts["train_negatives"] = sum(not r.boxes for r in dataset.records)
        return counts


def box_problem(box: Sequence[float], image_size: tuple[int, int], slack: float = 1.0) -> str | None:
    """Why a box (x0, y0, x1, y1) is wrong in an image of ``image_size`` (width, height), or None."""
    x0, y0, x1, y1 = (float(v) for v in box)
    width, height = image_size
    if not np.isfinite([x0, y0, x1, y1]).all() or x1 - x0 <= 0 or y1 - y0 <= 0:
        return "has no area"
    if x0 < -slack or y0 < -slack or x1 > width + slack or y1 > height + slack:
        return f"reaches outside the {width}x{height} image"
    return None


class DetectionModel(TaskModel):
    def load_kwargs(self, ref: str, labels: list[str]) -> dict[str, Any]:
        """Label maps, and RT-DETR's tied heads untied (peft cannot wrap tied heads)."""
        kwargs = super().load_kwargs(ref, labels)
        config = _config(ref)
        if config is not None and config.model_type.startswith(TIED_HEAD_TYPES):
            kwargs["tie_word_embeddings"] = False
        return kwargs

    def checkpoint(self, ref: str):
        """A DETR checkpoint with a timm ResNet backbone loads, without timm, from a converted copy
        whose every backbone tensor must load (see :mod:`visionlora.tasks.detection.timm_backbones`)."""
        config = _config(ref)
        if config is None or not needs_conversion(config):
            return ref, None
        return str(timm_free_checkpoint(ref, config, default_cache_dir())), partial(check_backbone_loaded, ref)

    def build_model(self, model_ref: str, labels: list[str], image_size: int | None, mode: str):
        """As every task; a converted timm-backbone DETR trains the stages timm's would in full mode."""
        model, processor, info = super().build_model(model_ref, labels, image_size, mode)
        if mode == "full" and is_converted(model):
            train_like_timm(model)
        return model, processor, info

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """Class and box predictors, each entry of a ModuleList of them, outermost matches only.

        An untied RT-DETR keeps unused top-level copies of its decoder's heads; the copies
        the decoder uses are the ones trained.
        """
        matches = [(name, module) for name, module in model.named_modules() if HEAD_PATTERN.search(name)]
        nested = {name.rsplit(".", 1)[-1] for name, _ in matches if "." in name}
        heads: list[str] = []
        for name, module in matches:
            if any(name.startswith(h + ".") for h in heads) or ("." not in name and name in nested):
                continue
            if isinstance(module, torch.nn.ModuleList):
                heads += [f"{name}.{i}" for i in range(len(module))]
            else:
                heads.append(name)
        if not heads:
            raise VisionLoraError(f"{type(model).__name__}: no class/box prediction heads found")
        return heads


class DetectionSteps(TaskSteps):
    packing_refusal = ("detection losses are taken over the batch as a whole (box matching normalised by the "
                       "batch's box count, and RT-DETR's denoising queries sized by its largest label set), so "
                       "the rows of several jobs would mix")

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Pad images to the largest in the batch (bottom/right) with a pixel mask, as DETR expects."""
        batch: dict[str, Any] = padded_batch([item["pixel_values"] for item in items], torch.uint8)
        batch["labels"] = [item["labels"] for item in items]
        batch["index"] = torch.tensor([item["index"] for item in items])
        return batch

    def device_batch(self, batch: dict[str, Any], normalizer: Normalizer) -> dict[str, Any]:
        """Pixels normalised with the padding at 0 (as predict pads normalised pixels); the mask widened."""
        mask = batch["pixel_mask"]
        batch["pixel_values"] = normalizer(batch["pixel_values"]).masked_fill_(mask.unsqueeze(1) == 0, 0.0)
        batch["pixel_mask"] = mask.long()
        return batch

    def loss(self, model, batch, info: ModelInfo) -> torch.Tensor:
        return model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"]).loss

    def eval_step(self, model, batch, processor, info: ModelInfo):
        outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
        sizes = [label["orig_size"].tolist() for label in batch["labels"]]  # (height, width) before resizing
        found = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
        return getattr(outputs, "loss", None), [_to_lists(f) for f in found]

    def metrics(self, dataset, indices, outputs, info: ModelInfo) -> dict[str, Any]:
        return detection_metrics(*_boxes_and_sizes(dataset, indices, outputs, info))


class DetectionPrediction(TaskPrediction):
    def hugging_face_answer(self, prediction, info: ModelInfo) -> list[dict[str, Any]]:
        """``[{"label", "score", "box": {"xmin", "ymin", "xmax", "ymax"}}, ...]`` in integer pixels."""
        return [{"label": found["label"], "score": found["score"], "box": pixel_box(found["box"])}
                for found in prediction["boxes"]]

    def model_inputs(self, pixels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return padded_batch(pixels, torch.long)

    def predict_inputs(self, image, image_index, processor, info, options):
        pixels = Normalizer(processor)(processor_pixels(processor, image))
        return [PredictInput(image_index, pixels, (image.height, image.width))]

    def decode(self, outputs, inputs, images, processor, info: ModelInfo, options) -> list[dict]:
        sizes = [item.meta for item in inputs]
        found = processor.post_process_object_detection(outputs, threshold=options["threshold"], target_sizes=sizes)
        results = []
        for boxes in found:
            lists = _to_lists(boxes)
            ranked = sorted(zip(lists["scores"], lists["labels"], lists["boxes"]), key=lambda t: -t[0])
            results.append({"boxes": [
                {"label": info.labels[label], "score": score, "box": [round(v, 2) for v in box]}
                for score, label, box in ranked
            ]})
        return results

    def draw(self, image: Image.Image, prediction: dict, info: ModelInfo) -> Image.Image:
        return draw_boxes(image, prediction["boxes"], info.labels)

    def tracked(self, prediction: dict) -> list[dict]:
        """Each box, tracked per label."""
        return prediction["boxes"]

    def uncertainty(self, prediction: dict) -> float:
        """One minus the mean score of the boxes found (1 where none is)."""
        scores = [float(found["score"]) for found in prediction["boxes"]]
        return 1.0 - sum(scores) / len(scores) if scores else 1.0

    def exact_outputs(self, model) -> bool:
        """RT-DETR-style models pick their queries by top-k over near-tied scores when barely trained."""
        return not getattr(model.config, "model_type", "").startswith(TIED_HEAD_TYPES)


class DetectionReport(TaskReport):
    def diagnostics(self, dataset, indices, outputs, info: ModelInfo) -> Diagnostics:
        curves = detection_curves(*_boxes_and_sizes(dataset, indices, outputs, info))
        defined = [c for c in curves.precision50.values() if c is not None]
        overall = np.mean(defined, axis=0) if defined else None
        plot = precision_recall_plot(curves.recall, curves.precision50, overall,
                                     "Precision-recall at IoU 0.5 (validation, best epoch)")
        return Diagnostics(curves.rows, {"precision_recall.png": plot})

    def ground_truth(self, record: DetectionRecord, image, info: ModelInfo):
        boxes = [{"label": label, "score": 1.0, "box": box} for box, label in zip(record.boxes, record.labels)]
        return {"boxes": boxes}, {}

    def out_of_sample_options(self, info: ModelInfo) -> dict[str, Any]:
        """Boxes down to a low score: cleanlab weighs them by their scores."""
        return {"threshold": OUT_OF_SAMPLE_THRESHOLD}

    def label_issues(self, records: list[DetectionRecord], predictions: list[dict[str, Any]],
                     info: ModelInfo) -> list[LabelIssue]:
        """cleanlab.object_detection: boxes overlooked, badly placed or of another class than predicted."""
        from cleanlab.object_detection.filter import find_label_issues
        from cleanlab.object_detection.rank import get_label_quality_scores

        labels = [{"bboxes": np.asarray(r.boxes, dtype=np.float64).reshape(-1, 4),
                   "labels": np.array([info.label2id[name] for name in r.labels], dtype=np.int64)} for r in records]
        found = [_per_class(p["boxes"], info) for p in predictions]
        with contextlib.redirect_stdout(io.StringIO()):  # cleanlab prints how many predictions it pruned
            flagged = find_label_issues(labels, found)
            scores = get_label_quality_scores(labels, found)
        return [LabelIssue(float(score), bool(flag), f"{len(r.boxes)} boxes given, {_confident(p)} predicted with "
                           f"a score over 0.5 by a model that never saw it")
                for r, p, score, flag in zip(records, predictions, scores, flagged)]


class DetectionTask(Task):
    """Fine-tune an object detector; the main metric is COCO mAP@[.5:.95] on validation."""

    name = "detection"
    data_formats = ("coco", "voc", "yolo")
    preset = Preset(
        model="facebook/detr-resnet-50",
        lora_r=8,
        lora_alpha=16,
        target_modules=("q_proj", "v_proj"),
        lr_lora=2e-4,
        lr_full=1e-4,
    )
    # Pretrained on procedural scenes (see visionlora.examples.procedural); RT-DETRv2 converges in
    # tens of epochs where DETR needs hundreds.
    builtin_models = (
        BuiltinModel("tiny", 64, "visionlora.tasks.detection.builtin:tiny_detr"),
        BuiltinModel("tiny-rtdetr", 64, "visionlora.tasks.detection.builtin:tiny_rtdetr"),
    )
    # Pretrained on procedural scenes (see visionlora.examples.procedural); RT-DETRv2 converges in
    # tens of epochs where DETR needs hundreds.
    demo = DemoRecipe(
        "scenes of 3 shapes the twin never saw (it learnt 12 others), COCO JSON, 48 train / 16 val images",
        "visionlora.examples.procedural:write_target_scenes",
        {"n_train": 48, "n_val": 16, "shapes": 3, "max_objects": 3}, model="tiny-rtdetr-pretrained", epochs=30,
        settings={"lora": {"lr": 2e-3, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "value_proj",
                                                          "output_proj", "fc1", "fc2"]},
                  "full": {"lr": 5e-4}})
    main_metric = "map"
    auto_class = "AutoModelForObjectDetection"
    pipeline_tag = "object-detection"
    card_does = "finds boxes of"
    fp16_unsafe = "DETR-family losses overflow in fp16"
    input_names = ("pixel_values", "pixel_mask")
    output_names = ("logits", "pred_boxes")
    dynamic_image_size = True
    predict_batch = 8
    predict_options = (
        Option("threshold", "lowest score of a box kept (default 0.5)", parse_float_between(0, 1, "threshold"), 0.5,
               "SCORE"),
    )
    label_formats = LABEL_FORMATS
    data_role = DetectionData
    model_role = DetectionModel
    steps_role = DetectionSteps
    prediction_role = DetectionPrediction
    report_role = DetectionReport


OUT_OF_SAMPLE_THRESHOLD = 0.05  # the lowest box score --label-errors asks for


def _per_class(boxes: list[dict[str, Any]], info: ModelInfo) -> np.ndarray:
    """A prediction's boxes as cleanlab takes them: for each class, an (M, 5) array of x0, y0, x1, y1, score."""
    per_class = np.empty(len(info.labels), dtype=object)
    for index, name in enumerate(info.labels):
        rows = [[*found["box"], found["score"]] for found in boxes if found["label"] == name]
        per_class[index] = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    return per_class


def _confident(prediction: dict[str, Any]) -> int:
    return sum(found["score"] > 0.5 for found in prediction["boxes"])


def padded_batch(pixels: list[torch.Tensor], mask_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Pixels of any type padded with zeros to the largest (bottom/right), and the mask of the real ones."""
    height = max(p.shape[1] for p in pixels)
    width = max(p.shape[2] for p in pixels)
    if all(p.shape[1:] == (height, width) for p in pixels):
        mask = batch_buffer("pixel_mask", (len(pixels), height, width), mask_dtype).fill_(1)
        return {"pixel_values": stacked(pixels, "pixel_values"), "pixel_mask": mask}
    padded = batch_buffer("pixel_values", (len(pixels), 3, height, width), pixels[0].dtype)
    mask = batch_buffer("pixel_mask", (len(pixels), height, width), mask_dtype)
    for index, image in enumerate(pixels):
        _, h, w = image.shape
        padded[index, :, :h, :w] = image
        mask[index, :h, :w] = 1
    return {"pixel_values": padded, "pixel_mask": mask}


def _boxes_and_sizes(dataset, indices, outputs, info: ModelInfo):
    """(ground truth, predictions, label names, image sizes) of the evaluated items, for COCOeval."""
    records = [dataset.records[i] for i in indices]
    targets = [ImageBoxes(r.boxes, [info.label2id[name] for name in r.labels]) for r in records]
    found = [ImageBoxes(o["boxes"], o["labels"], o["scores"]) for o in outputs]
    return targets, found, info.labels, [dataset.original_size(i) for i in indices]


# -- datasets ---------------------------------------------------------------------------
class DetectionImages(SeededDataset):
    """Images at model scale (uint8 (H, W, 3) in the cache) with their boxes; targets normalised (cx, cy, w, h)."""

    def __init__(self, images: StoredImages, records: list[DetectionRecord], label2id: dict[str, int],
                 seed: int = 0):
        self.images, self.records, self.label2id, self.seed = images, records, label2id, seed
        self.dropped: list[dict[str, str]] = []

    def __len__(self) -> int:
        return len(self.records)

    def original_size(self, index: int) -> tuple[int, int]:
        """(height, width) of the image as decoded (EXIF applied)."""
        return tuple(self.images.meta(index)["original_size"])

    def scaled_boxes(self, index: int) -> list[list[float]]:
        """The record's boxes in the cached image's pixels."""
        sx, sy = self.images.meta(index)["scale"]
        return [[x0 * sx, y0 * sy, x1 * sx, y1 * sy] for x0, y0, x1, y1 in self.records[index].boxes]

    def labels_of(self, index: int) -> list[int]:
        return [self.label2id[name] for name in self.records[index].labels]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._item(chw(self.images[index]["pixels"]), self.scaled_boxes(index), self.labels_of(index), index)

    def _item(self, pixel_values: torch.Tensor, boxes_xyxy, labels: list[int], index: int) -> dict[str, Any]:
        """DETR targets: (cx, cy, w, h) relative to the unpadded image, and the original size."""
        _, height, width = pixel_values.shape
        corners = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
        centred = corners_to_center_format(corners) / np.array([width, height, width, height], dtype=np.float32)  # type: ignore[arg-type, operator]  # numpy arrays are among the TensorTypes it takes
        target = {
            "class_labels": torch.tensor(labels, dtype=torch.long),
            "boxes": torch.from_numpy(centred.astype(np.float32)),
            "orig_size": torch.tensor(self.original_size(index)),
        }
        return {"pixel_values": pixel_values, "labels": target, "index": index}


class AugmentedDetection(DetectionImages):
    """Flip, scale/shift and colour changes that move the boxes with the image."""

    def __init__(self, cached, records, label2id, seed: int):
        super().__init__(cached, records, label2id, seed)
        self.augment = A.Compose(
            [
                A.HorizontalFlip(p=0.5),
                A.Affine(scale=(0.8, 1.2), translate_percent=(-0.1, 0.1), p=0.5),
                A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
            ],
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_area=1.0, min_visibility=0.2,
                                     clip=True),
            seed=0,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        self.augment.set_random_seed(self.item_seed(index))
        boxes = np.asarray(self.scaled_boxes(index), dtype=np.float32).reshape(-1, 4)
        out = self.augment(image=self.images[index]["pixels"], bboxes=boxes, labels=self.labels_of(index))
        labels = [int(v) for v in out["labels"]]
        return self._item(chw(out["image"]), np.asarray(out["bboxes"]).reshape(-1, 4), labels, index)


def _config(ref: str):
    """The checkpoint's config, or None when it cannot be read (loading reports that later)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref)
    except (OSError, ValueError):
        return None


def _decoded_dataset(kind: type, records: list[DetectionRecord], processor, info: ModelInfo,
                     cache: CachePlan | None, seed: int = 0):
    """(dataset, skipped files): the images decoded once at model scale, boxes fitted to them.

    The boxes dropped while fitting are listed in the dataset's ``dropped``.
    """
    decoded = decode_records(records, lambda image, _: _model_scale(processor, image), cache=cache,
                             settings=f"detection|hwc|{processor.to_json_string()}")
    fitted, dropped = _fit_boxes([records[i] for i in decoded.kept], decoded.items)
    dataset = kind(decoded.items, fitted, info.label2id, seed)
    dataset.dropped, dataset.cache_report = dropped, decoded.report
    return dataset, decoded.skipped


def _model_scale(processor, image: Image.Image) -> dict[str, Any]:
    """The processor's resize of ``image`` (uint8, (H, W, 3): what augmentation reads) and the scale
    from original pixels."""
    pixels = processor_pixels(processor, image)
    _, height, width = pixels.shape
    return {"pixels": np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()),
            "scale": (width / image.width, height / image.height), "original_size": (image.height, image.width)}


def _fit_boxes(records: list[DetectionRecord], images: StoredImages) -> tuple[list[DetectionRecord], list[dict]]:
    """Clip boxes to the decoded image (whose EXIF-applied size may differ from the annotation's)."""
    fitted, dropped = [], []
    for index, record in enumerate(records):
        height, width = images.meta(index)["original_size"]
        kept = DetectionRecord(record.image, source=record.source)
        for box, label in zip(record.boxes, record.labels):
            cleaned = clean_box(box, width, height)
            if cleaned is None:
                dropped.append({"annotation": record.source,
                                "reason": f"box {box} lies outside the {width}x{height} image"})
            else:
                kept.boxes.append(cleaned)
                kept.labels.append(label)
        fitted.append(kept)
    return fitted, dropped


def _to_lists(found: dict[str, torch.Tensor]) -> dict[str, list]:
    return {
        "boxes": found["boxes"].float().cpu().tolist(),
        "labels": found["labels"].cpu().tolist(),
        "scores": found["scores"].float().cpu().tolist(),
    }
