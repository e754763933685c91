"""Semantic segmentation: any transformers semantic-segmentation model (SegFormer by default);
the main metric is the mean IoU over the validation pixels.

Images and masks are resized to the model's input size once (masks with nearest neighbour)
and cached together; augmentation moves the mask with the image. Validation metrics are
computed at that input size. Predictions are upsampled to each image's own size.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visionlora.core.outputs import DRAWN_IMAGES, JSON_OUTPUT, OutputWriter, png_bytes
from visionlora.core.plots import confusion_matrix_plot
from visionlora.data.cache import CachePlan
from visionlora.data.formats import SEGMENTATION_FORMAT_NAMES
from visionlora.data.images import decode_all, load_rgb
from visionlora.data.masks import IGNORE_INDEX, SegmentationRecord, load_mask, voc_palette
from visionlora.data.records import Part, SourceData
from visionlora.data.transforms import Normalizer, chw, processor_output_size, processor_pixels, tensor_view
from visionlora.errors import VisionLoraError
from visionlora.metrics.segmentation import confusion_matrix, per_class_rows, segmentation_metrics
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
    TaskState,
)
from visionlora.tasks.records import task_state
from visionlora.tasks.roles import TaskData, TaskModel, TaskPrediction, TaskReport, TaskSteps
from visionlora.tasks.segmentation.plots import class_iou_plot
from visionlora.tasks.segmentation.prelabels import LABEL_FORMATS
from visionlora.tasks.segmentation.writers import mask_png, write_masks

OVERLAY_OPACITY = 0.5
VOC_COLOURS = voc_palette(256)  # every class id's colour where the data gives none
MASKS = OutputWriter("save_masks", "also save each predicted mask as a palette PNG (pixel value = class id)", "DIR",
                     write_masks)


@dataclass
class SegmentationState(TaskState):
    """A segmentation run's own facts: the mask value ignored by the loss and metrics, and the
    data's colours per class (a VOC label map's), for drawing."""

    ignore_index: int = IGNORE_INDEX
    palette: list[list[int]] | None = None


class SegmentationData(TaskData):
    def check_record(self, record: SegmentationRecord, image_size: tuple[int, int], labels: list[str]) -> list[str]:
        """A mask that is missing or unreadable, differs in size from its image, or holds values that are
        not among the classes (nor the ignore value)."""
        try:
            load_mask(record, len(labels), IGNORE_INDEX, image_size)
        except VisionLoraError as err:
            return [str(err)]
        return []

    def check_data(self, source: SourceData, held_out: list[Part], where: str) -> None:
        if len(source.labels) < 2:
            raise VisionLoraError(f"{where}: {len(source.labels)} class; segmentation needs at least two "
                                  "(e.g. background and one more)")
        super().check_data(source, held_out, where)

    def state_from_data(self, source: SourceData, info: ModelInfo, cfg) -> SegmentationState:
        """The data's ignore value, and its palette (for drawing) where it has one."""
        given = source.extra.get("palette")
        return SegmentationState(int(source.extra.get("ignore_index", IGNORE_INDEX)),
                                 [list(colour) for colour in given] if given else None)

    def train_dataset(self, source: SourceData, processor, info: ModelInfo, cfg, cache: CachePlan):
        dataset, skipped = self.eval_dataset(source.train, processor, info, cache)
        if not cfg.augment:
            return dataset, skipped
        augmented = AugmentedMasks(dataset.items, cfg.seed, ignore_index(info))
        augmented.cache_report = dataset.cache_report
        return augmented, skipped

    def eval_dataset(self, records: list[SegmentationRecord], processor, info: ModelInfo,
                     cache: CachePlan | None = None):
        height, width = processor_output_size(processor)
        ignore = ignore_index(info)

        def prepare(image: Image.Image, record: SegmentationRecord) -> dict[str, Any]:
            mask = load_mask(record, len(info.labels), ignore, image.size)
            resized = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
            pixels = processor_pixels(processor, image).permute(1, 2, 0).numpy()
            return {"pixels": np.ascontiguousarray(pixels), "mask": resized}

        decoded = decode_all(records, prepare, name_of=lambda record: str(record.image),
                             opener=lambda record: load_rgb(record.image), cache=cache,
                             settings=f"segmentation|hwc|{len(info.labels)}|{ignore}|{processor.to_json_string()}")
        dataset = MaskedImages(decoded.items)
        dataset.cache_report = decoded.report
        return dataset, decoded.skipped

    def image_bytes(self, processor, info: ModelInfo) -> int:
        height, width = processor_output_size(processor)
        return height * width * 4  # RGB and the mask


class SegmentationModel(TaskModel):
    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """Everything beside the backbone, trained in full: the decode head, and the auxiliary head, neck
        or FPN where the architecture has them (SegFormer, UperNet, BEiT, DPT, MobileViT)."""
        backbones = {getattr(model, "base_model_prefix", ""), "backbone"}
        heads = [name for name, module in model.named_children()
                 if name not in backbones and any(True for _ in module.parameters())]
        if not heads:
            raise VisionLoraError(f"{type(model).__name__}: no segmentation head beside its backbone")
        return heads


class SegmentationSteps(TaskSteps):
    def device_batch(self, batch: dict[str, Any], normalizer: Normalizer) -> dict[str, Any]:
        """Pixels normalised, and the uint8 class maps widened to the loss's int64."""
        batch = super().device_batch(batch, normalizer)
        batch["labels"] = batch["labels"].long()
        return batch

    def loss_of_outputs(self, outputs, batch, info: ModelInfo) -> torch.Tensor:
        return pixel_loss(outputs.logits, batch["labels"], ignore_index(info))

    def eval_step(self, model, batch, processor, info: ModelInfo):
        logits = model(pixel_values=batch["pixel_values"], **info.forward_kwargs).logits
        labels = batch["labels"]
        upsampled = upsample(logits, labels.shape[-2:])
        loss = F.cross_entropy(upsampled, labels, ignore_index=ignore_index(info))
        predicted = upsampled.argmax(dim=1).cpu()
        return loss, [confusion_matrix(p, t, len(info.labels), ignore_index(info))
                      for p, t in zip(predicted, labels.cpu())]

    def top1(self, output: torch.Tensor) -> torch.Tensor:
        """The class of each pixel (logits are (N, classes, H, W))."""
        return output.argmax(dim=1)

    def metrics(self, dataset, indices, outputs, info: ModelInfo) -> dict[str, Any]:
        return segmentation_metrics(np.sum(outputs, axis=0), info.labels)


class SegmentationPrediction(TaskPrediction):
    def hugging_face_answer(self, prediction, info: ModelInfo) -> list[dict[str, Any]]:
        """``[{"label", "score": null, "mask": BASE64_PNG}, ...]``: a black-and-white mask (255 where the class
        is) per class present, in label order, as transformers' semantic segmentation pipeline answers."""
        classes = np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["mask"]))))
        answers = []
        for index, label in enumerate(info.labels):
            if label in prediction["areas"]:
                mask = Image.fromarray(np.where(classes == index, 255, 0).astype(np.uint8), mode="L")
                answers.append({"label": label, "score": None, "mask": base64.b64encode(png_bytes(mask)).decode()})
        return answers

    def predict_inputs(self, image, image_index, processor, info, options):
        return [PredictInput(image_index, Normalizer(processor)(processor_pixels(processor, image)))]

    def output_uncertainty(self, outputs) -> list[float]:
        """Each input's mean pixel entropy of the class probabilities, over the entropy of a uniform guess."""
        probabilities = outputs.logits.float().softmax(dim=1)
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=1)
        return (entropy.mean(dim=(1, 2)) / max(math.log(probabilities.shape[1]), 1e-12)).clamp(0, 1).tolist()

    def decode(self, outputs, inputs, images, processor, info: ModelInfo, options) -> list[dict]:
        results = []
        for logits, item in zip(outputs.logits.float(), inputs):
            image = images[item.image_index]
            mask = upsample(logits[None], (image.height, image.width))[0].argmax(dim=0)
            results.append(describe_mask(mask.cpu().numpy().astype(np.uint8), info))
        return results

    def draw(self, image: Image.Image, prediction: dict, info: ModelInfo) -> Image.Image:
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["mask"]))))
        colours = np.asarray(palette(info), dtype=np.float32)[mask]  # 256 colours, one per uint8 value
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        drawn = np.where((mask == ignore_index(info))[..., None], pixels,
                         (1 - OVERLAY_OPACITY) * pixels + OVERLAY_OPACITY * colours)
        return Image.fromarray(drawn.round().clip(0, 255).astype(np.uint8))


class SegmentationReport(TaskReport):
    def label_issues(self, records: list[SegmentationRecord], predictions: list[dict[str, Any]],
                     info: ModelInfo) -> list[LabelIssue]:
        """Per image, the mean IoU of the given mask with the out-of-sample one; under MIN_IOU is flagged."""
        issues = []
        for record, prediction in zip(records, predictions):
            predicted = np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["mask"]))))
            given = load_mask(record, len(info.labels), ignore_index(info), tuple(prediction["size"]))
            issues.append(mask_issue(given, predicted, info.labels, ignore_index(info)))
        return issues

    def diagnostics(self, dataset, indices, outputs, info: ModelInfo) -> Diagnostics:
        confusion = np.sum(outputs, axis=0)
        rows = per_class_rows(confusion, info.labels)
        figures = {"confusion_matrix.png": confusion_matrix_plot(confusion, info.labels),
                   "class_iou.png": class_iou_plot(rows)}
        return Diagnostics(rows, figures)

    def ground_truth(self, record: SegmentationRecord, image: Image.Image, info: ModelInfo):
        mask = load_mask(record, len(info.labels), ignore_index(info), image.size)
        return describe_mask(mask, info), {}

    def caption(self, prediction: dict[str, Any]) -> str:
        shares = prediction["shares"]
        largest = sorted(shares, key=shares.get, reverse=True)[:2]
        return ", ".join(f"{name} {shares[name]:.0%}" for name in largest)


MIN_IOU = 0.5  # an image whose mask agrees less than this (mean IoU) with the prediction is flagged


def mask_issue(given: np.ndarray, predicted: np.ndarray, labels: list[str], ignore: int) -> LabelIssue:
    """The mean IoU, over the classes either mask holds, of a given mask and a predicted one of its size."""
    valid = given != ignore
    ious = {}
    for class_id in np.union1d(np.unique(given[valid]), np.unique(predicted[valid])):
        ours, theirs = (given == class_id) & valid, (predicted == class_id) & valid
        union = int((ours | theirs).sum())
        ious[int(class_id)] = int((ours & theirs).sum()) / union if union else 1.0
    mean = float(np.mean(list(ious.values()))) if ious else 1.0
    worst = min(ious, key=ious.__getitem__) if ious else 0
    name = labels[worst] if worst < len(labels) else str(worst)
    return LabelIssue(mean, mean < MIN_IOU, f"mean IoU {mean:.2f} with the prediction of a model that never saw it "
                      f"(worst: {name}, IoU {ious.get(worst, 1.0):.2f})")


class SegmentationTask(Task):
    """Fine-tune a semantic segmentation model; the main metric is the validation mean IoU."""

    name = "segmentation"
    data_formats = SEGMENTATION_FORMAT_NAMES
    preset = Preset(
        model="nvidia/mit-b0",
        lora_r=16,
        lora_alpha=32,
        target_modules=("query", "value"),
        lr_lora=2e-4,
        lr_full=6e-5,
    )
    builtin_models = (BuiltinModel("tiny", 64, "visionlora.tasks.segmentation.builtin:tiny_segformer"),)
    demo = DemoRecipe("scenes of 3 shapes the twin never saw (it learnt 12 others), images+masks, 48 train / 12 val",
                      "visionlora.examples.procedural:write_target_segmentation",
                      {"n_train": 48, "n_val": 12, "shapes": 3, "max_objects": 3}, model="tiny-pretrained",
                      epochs=100, settings={"lora": {"lr": 3e-3}, "full": {"lr": 1e-3}})
    main_metric = "mean_iou"
    auto_class = "AutoModelForSemanticSegmentation"
    pipeline_tag = "image-segmentation"
    card_does = "labels every pixel of an image with one of"
    fixed_labels = True
    label_noun = "classes"
    output_names = ("logits",)
    writers = (JSON_OUTPUT, DRAWN_IMAGES, MASKS)
    label_formats = LABEL_FORMATS
    freeze_batchnorm_in_lora = False  # the decode head's BatchNorm is new and trained with it
    predict_batch = 8
    state_type = SegmentationState
    data_role = SegmentationData
    model_role = SegmentationModel
    steps_role = SegmentationSteps
    prediction_role = SegmentationPrediction
    report_role = SegmentationReport


def segmentation_state(info: ModelInfo) -> SegmentationState:
    return task_state(info, SegmentationState)


def ignore_index(info: ModelInfo) -> int:
    return int(segmentation_state(info).ignore_index)


def palette(info: ModelInfo) -> list[tuple[int, int, int]]:
    """The data's colours (a VOC label map's), else the VOC palette, for every class id."""
    given = [(int(r), int(g), int(b)) for r, g, b in segmentation_state(info).palette or []]
    return given + VOC_COLOURS[len(given):]


def upsample(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, C, h, w) logits -> (N, C, H, W), bilinear, as the Hugging Face segmentation examples do."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


def pixel_loss(logits: torch.Tensor, labels: torch.Tensor, ignore: int) -> torch.Tensor:
    """Cross-entropy over the labelled pixels, the logits upsampled to the labels' size."""
    return F.cross_entropy(upsample(logits, labels.shape[-2:]), labels, ignore_index=ignore)


def describe_mask(mask: np.ndarray, info: ModelInfo) -> dict[str, Any]:
    """JSON-ready: pixels and share of the image per class present, the mask as a base64 palette PNG."""
    counts = np.bincount(mask.ravel(), minlength=256)[: len(info.labels)]
    total = max(int(counts.sum()), 1)
    areas = {info.labels[i]: int(n) for i, n in enumerate(counts) if n}
    return {"areas": areas, "shares": {name: n / total for name, n in areas.items()},
            "size": [int(mask.shape[1]), int(mask.shape[0])],
            "mask": base64.b64encode(mask_png(mask, palette(info))).decode()}


class MaskedImages(SeededDataset):
    """Cached model-sized uint8 images (H, W, 3) with their uint8 masks (widened on the device)."""

    def __init__(self, items):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        return _item(item["pixels"], item["mask"], index)


class AugmentedMasks(MaskedImages):
    """Flip, scale/shift/rotate and colour changes that move the mask with the image (albumentations);
    pixels moved in from outside the image are ignored in the loss."""

    def __init__(self, items, seed: int, ignore: int):
        super().__init__(items)
        self.seed = seed
        self.augment = A.Compose([
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.8, 1.25), translate_percent=(-0.1, 0.1), rotate=(-10, 10), fill_mask=ignore,
                     mask_interpolation=cv2.INTER_NEAREST, p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ], seed=0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        self.augment.set_random_seed(self.item_seed(index))
        out = self.augment(image=item["pixels"], mask=item["mask"])
        return _item(out["image"], out["mask"], index)


def _item(pixels: np.ndarray, mask: np.ndarray, index: int) -> dict[str, Any]:
    """uint8 pixels (3, H, W) and class map (H, W), as views where the arrays allow."""
    return {"pixel_values": chw(pixels), "labels": tensor_view(mask), "index": index}
