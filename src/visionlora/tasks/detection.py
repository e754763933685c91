"""Object detection: DETR by default, any transformers object-detection model; COCO mAP."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import albumentations as A
import numpy as np
import torch
from PIL import Image

from visionlora.data.detection import (
    VAL_DIRS,
    DetectionData,
    DetectionRecord,
    clean_box,
    read_detection_data,
    read_detection_split,
)
from visionlora.data.images import decode_records
from visionlora.data.transforms import Normalizer, processor_pixels, processor_size, set_processor_size
from visionlora.errors import VisionLoraError
from visionlora.metrics.detection import ImageBoxes, detection_metrics
from visionlora.models import load_pretrained
from visionlora.tasks.base import Datasets, ModelInfo, Preset, dataset_behind
from visionlora.visualize import draw_boxes

TINY_SHORTEST_EDGE = 64
PREDICT_BATCH = 8
# Module names of detection heads across DETR-family models (class and box predictors).
HEAD_PATTERN = re.compile(
    r"(^|\.)(class_labels_classifier|bbox_predictor|class_embed|bbox_embed|enc_score_head|enc_bbox_head|denoising_class_embed)$"
)


class DetectionTask:
    """Fine-tune an object detector; the main metric is COCO mAP@[.5:.95] on validation."""

    name = "detection"
    preset = Preset(
        model="facebook/detr-resnet-50",
        lora_r=8,
        lora_alpha=16,
        target_modules=("q_proj", "v_proj"),
        lr_lora=2e-4,
        lr_full=1e-4,
    )
    main_metric = "map"
    greater_is_better = True

    # -- data -------------------------------------------------------------------------
    def read_data(self, cfg) -> DetectionData:
        return read_detection_data(cfg.data, cfg.val_data, cfg.seed, cfg.holdout())

    def make_datasets(self, source: DetectionData, processor, info: ModelInfo, cfg) -> Datasets:
        label2id = info.label2id
        dropped = list(source.dropped_boxes)
        train_images, train_records = _decode(source.train, processor, dropped)
        val_images, val_records = _decode(source.val, processor, dropped)
        if not train_records:
            raise VisionLoraError(f"{source.description['train']}: no readable training images")
        if not any(r.boxes for r in val_records):
            raise VisionLoraError(f"{source.description['val']}: no readable validation images with boxes")
        normalizer = Normalizer(processor)
        counts = {
            "train": len(train_records),
            "val": len(val_records),
            "train_boxes": sum(len(r.boxes) for r in train_records),
            "val_boxes": sum(len(r.boxes) for r in val_records),
            "train_negatives": sum(not r.boxes for r in train_records),
            "dropped_boxes": len(dropped),
        }
        description = {**source.description, "dropped_boxes": dropped}
        return Datasets(
            train=AugmentedDetection(train_images.items, train_records, label2id, normalizer, cfg.seed)
            if cfg.augment
            else DetectionImages(train_images.items, train_records, label2id, normalizer),
            val=DetectionImages(val_images.items, val_records, label2id, normalizer),
            counts=counts,
            skipped=source.skipped + train_images.skipped + val_images.skipped,
            description=description,
        )

    def make_eval_dataset(self, data: str, processor, info: ModelInfo):
        """Boxes for ``evaluate``: the val part of ``data`` when it has one, else all of it."""
        path = Path(data)
        val_dir = next((path / n for n in VAL_DIRS if (path / n).is_dir()), None) if path.is_dir() else None
        split = read_detection_split(val_dir or path)
        unknown = sorted({label for r in split.records for label in r.labels} - set(info.labels))
        if unknown:
            raise VisionLoraError(f"{data}: categories the model was not trained on: {', '.join(unknown)}")
        decoded, records = _decode(split.records, processor, [])
        return DetectionImages(decoded.items, records, info.label2id, Normalizer(processor)), decoded.skipped

    # -- model ------------------------------------------------------------------------
    def build_model(self, model_ref: str, labels: list[str], image_size: int | None):
        id2label = dict(enumerate(labels))
        label2id = {name: i for i, name in id2label.items()}
        if model_ref == "tiny":
            model, processor = _tiny_detr(id2label, label2id, image_size or TINY_SHORTEST_EDGE)
        elif model_ref == "tiny-rtdetr":
            model, processor = _tiny_rtdetr(id2label, label2id, image_size or TINY_SHORTEST_EDGE)
        else:
            from transformers import AutoModelForObjectDetection

            model, processor = load_pretrained(
                AutoModelForObjectDetection, model_ref, num_labels=len(labels), id2label=id2label, label2id=label2id,
                **_untied(model_ref),
            )
            if image_size:
                set_processor_size(processor, image_size)
        info = ModelInfo(task=self.name, mode="", base_model=model_ref, labels=list(labels), image_size=processor_size(processor))
        return model, processor, info

    def load_model(self, path: str, info: ModelInfo) -> torch.nn.Module:
        from transformers import AutoModelForObjectDetection

        model, _ = load_pretrained(
            AutoModelForObjectDetection, path, with_processor=False,
            num_labels=len(info.labels), id2label=info.id2label, label2id=info.label2id, **_untied(path),
        )
        return model

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

    # -- steps ------------------------------------------------------------------------
    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Pad images to the largest in the batch (bottom/right) with a pixel mask, as DETR expects."""
        height = max(item["pixel_values"].shape[1] for item in items)
        width = max(item["pixel_values"].shape[2] for item in items)
        pixels = torch.zeros(len(items), 3, height, width)
        mask = torch.zeros(len(items), height, width, dtype=torch.long)
        for index, item in enumerate(items):
            _, h, w = item["pixel_values"].shape
            pixels[index, :, :h, :w] = item["pixel_values"]
            mask[index, :h, :w] = 1
        return {
            "pixel_values": pixels,
            "pixel_mask": mask,
            "labels": [item["labels"] for item in items],
            "index": torch.tensor([item["index"] for item in items]),
        }

    def loss(self, model, batch, info: ModelInfo) -> torch.Tensor:
        return model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"]).loss

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator, info: ModelInfo) -> dict[str, Any]:
        model.eval()
        dataset = dataset_behind(loader, DetectionImages)
        processor_post = _post_processor(model)
        losses, predictions = [], {}
        for batch in loader:
            outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
            losses.append(accelerator.gather_for_metrics(outputs.loss.detach().float().reshape(1)).mean())
            sizes = [dataset.original_sizes[i] for i in batch["index"].tolist()]
            found = processor_post(outputs, threshold=0.0, target_sizes=sizes)
            rows = [(i, _to_lists(f)) for i, f in zip(batch["index"].tolist(), found)]
            for index, boxes in accelerator.gather_for_metrics(rows, use_gather_object=True):
                predictions[index] = boxes
        order = sorted(predictions)
        targets = [ImageBoxes(dataset.records[i].boxes, [info.label2id[l] for l in dataset.records[i].labels]) for i in order]
        found = [ImageBoxes(predictions[i]["boxes"], predictions[i]["labels"], predictions[i]["scores"]) for i in order]
        sizes = [dataset.original_sizes[i] for i in order]
        metrics = {"loss": float(torch.stack(losses).mean())}
        metrics.update(detection_metrics(targets, found, info.labels, sizes))
        return metrics

    @torch.no_grad()
    def predict(self, model, processor, images: Sequence[Image.Image], info: ModelInfo, threshold: float = 0.5, **_) -> list[dict]:
        model.eval()
        normalizer = Normalizer(processor)
        device = next(model.parameters()).device
        post = _post_processor(model)
        results = []
        for start in range(0, len(images), PREDICT_BATCH):
            chunk = images[start : start + PREDICT_BATCH]
            items = [{"pixel_values": normalizer(processor_pixels(processor, im)), "labels": None, "index": 0} for im in chunk]
            batch = self.collate(items)
            outputs = model(pixel_values=batch["pixel_values"].to(device), pixel_mask=batch["pixel_mask"].to(device))
            found = post(outputs, threshold=threshold, target_sizes=[(im.height, im.width) for im in chunk])
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


# -- datasets ---------------------------------------------------------------------------
class DetectionImages(torch.utils.data.Dataset):
    """Cached images at model scale with their boxes; targets normalised (cx, cy, w, h)."""

    def __init__(self, cached: list[dict], records: list[DetectionRecord], label2id: dict[str, int], normalizer):
        self.pixels = [c["pixels"] for c in cached]
        self.scales = [c["scale"] for c in cached]
        self.original_sizes = [c["original_size"] for c in cached]
        self.records, self.label2id, self.normalizer = records, label2id, normalizer

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixels = self.pixels[index]
        sx, sy = self.scales[index]
        boxes = [[x0 * sx, y0 * sy, x1 * sx, y1 * sy] for x0, y0, x1, y1 in self.records[index].boxes]
        labels = [self.label2id[name] for name in self.records[index].labels]
        return _item(self.normalizer(pixels), boxes, labels, index)


class AugmentedDetection(DetectionImages):
    """Flip, scale/shift and colour changes that move the boxes with the image.

    The augmentation of item ``i`` in epoch ``e`` depends only on (seed, e, i).
    """

    def __init__(self, cached, records, label2id, normalizer, seed: int):
        super().__init__(cached, records, label2id, normalizer)
        self.augment = A.Compose(
            [
                A.HorizontalFlip(p=0.5),
                A.Affine(scale=(0.8, 1.2), translate_percent=(-0.1, 0.1), p=0.5),
                A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
            ],
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_area=1.0, min_visibility=0.2, clip=True),
            seed=0,
        )
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        plain = super().__getitem__(index)
        image = self.pixels[index].permute(1, 2, 0).numpy()
        sx, sy = self.scales[index]
        boxes = [[x0 * sx, y0 * sy, x1 * sx, y1 * sy] for x0, y0, x1, y1 in self.records[index].boxes]
        self.augment.set_random_seed(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF)
        out = self.augment(image=image, bboxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4), labels=plain["labels"]["class_labels"].tolist())
        pixels = torch.from_numpy(np.ascontiguousarray(out["image"])).permute(2, 0, 1)
        labels = [int(v) for v in out["labels"]]
        return _item(self.normalizer(pixels), np.asarray(out["bboxes"]).reshape(-1, 4).tolist(), labels, index)


def _item(pixel_values: torch.Tensor, boxes_xyxy, labels: list[int], index: int) -> dict[str, Any]:
    """A dataset item: DETR targets are (cx, cy, w, h) relative to the unpadded image."""
    _, height, width = pixel_values.shape
    boxes = torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
    centred = torch.stack(
        [(boxes[:, 0] + boxes[:, 2]) / 2 / width, (boxes[:, 1] + boxes[:, 3]) / 2 / height,
         (boxes[:, 2] - boxes[:, 0]) / width, (boxes[:, 3] - boxes[:, 1]) / height], dim=1,
    )
    target = {"class_labels": torch.tensor(labels, dtype=torch.long), "boxes": centred}
    return {"pixel_values": pixel_values, "labels": target, "index": index}


def _decode(records: list[DetectionRecord], processor, dropped: list) -> tuple[Any, list[DetectionRecord]]:
    """Decode the images once at model scale; return them and the readable records, boxes fitted."""
    decoded = decode_records(records, lambda image, _: _model_scale(processor, image))
    return decoded, _fit_boxes([records[i] for i in decoded.kept], decoded.items, dropped)


def _model_scale(processor, image: Image.Image) -> dict[str, Any]:
    """The processor's resize of ``image`` (uint8, CHW) and the scale from original pixels."""
    pixels = processor_pixels(processor, image)
    _, height, width = pixels.shape
    return {"pixels": pixels, "scale": (width / image.width, height / image.height), "original_size": (image.height, image.width)}


def _fit_boxes(records: list[DetectionRecord], cached: list[dict], dropped: list) -> list[DetectionRecord]:
    """Clip boxes to the decoded image (whose EXIF-applied size may differ from the annotation's)."""
    fitted = []
    for record, item in zip(records, cached):
        height, width = item["original_size"]
        kept = DetectionRecord(record.image, source=record.source)
        for box, label in zip(record.boxes, record.labels):
            cleaned = clean_box(box, width, height)
            if cleaned is None:
                dropped.append({"annotation": record.source, "reason": f"box {box} lies outside the {width}x{height} image"})
            else:
                kept.boxes.append(cleaned)
                kept.labels.append(label)
        fitted.append(kept)
    return fitted


def _post_processor(model):
    """The model's own post-processing, from its image processor class (DETR-style by default)."""
    from transformers import DetrImageProcessorPil

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "detr")
    if model_type.startswith("rt_detr") or model_type.startswith("d_fine"):
        from transformers import RTDetrImageProcessorPil

        return RTDetrImageProcessorPil().post_process_object_detection
    return DetrImageProcessorPil().post_process_object_detection


def _to_lists(found: dict[str, torch.Tensor]) -> dict[str, list]:
    return {
        "boxes": found["boxes"].float().cpu().tolist(),
        "labels": found["labels"].cpu().tolist(),
        "scores": found["scores"].float().cpu().tolist(),
    }


def _tiny_detr(id2label, label2id, shortest_edge: int):
    """A DETR with a 4-stage, 16-128 channel ResNet, one 64-wide encoder/decoder layer, 5 queries."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessorPil, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic", out_features=["stage4"]
    )
    config = DetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
        num_labels=len(id2label), id2label=id2label, label2id=label2id,
        d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=5, dropout=0.0,
    )
    processor = DetrImageProcessorPil(size={"shortest_edge": shortest_edge, "longest_edge": round(shortest_edge * 1333 / 800)})
    model = DetrForObjectDetection(config)
    # DETR freezes its backbone, expecting pretrained features; a random one must learn.
    for param in model.parameters():
        param.requires_grad_(True)
    return model, processor


def _untied(ref: str) -> dict[str, Any]:
    """Loading options for ``ref``: RT-DETR's tied heads untied (peft cannot wrap them).

    A checkpoint with a timm backbone (the original ``facebook/detr-resnet-50``) is a clear
    error when timm is not installed.
    """
    import importlib.util

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError):
        return {}  # load_pretrained reports the problem
    backbone = getattr(config, "backbone_config", None)
    uses_timm = getattr(config, "use_timm_backbone", False) or getattr(backbone, "model_type", "") == "timm_backbone"
    if uses_timm and importlib.util.find_spec("timm") is None:
        raise VisionLoraError(
            f"{ref}: this checkpoint's backbone needs timm (pip install timm), or use a model without it, "
            "e.g. --model PekingU/rtdetr_v2_r18vd"
        )
    return {"tie_word_embeddings": False} if config.model_type.startswith(("rt_detr", "d_fine", "deimv2")) else {}


def _tiny_rtdetr(id2label, label2id, size: int):
    """An RT-DETRv2 with a 16-128 channel ResNet, a 64-wide encoder and 2 decoder layers, 20 queries."""
    from transformers import RTDetrImageProcessorPil, RTDetrResNetConfig, RTDetrV2Config, RTDetrV2ForObjectDetection

    backbone = RTDetrResNetConfig(
        layer_type="basic", embedding_size=16, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
        downsample_in_bottleneck=False, out_indices=[2, 3, 4],
    )
    config = RTDetrV2Config(
        backbone_config=backbone, num_labels=len(id2label), id2label=id2label, label2id=label2id,
        tie_word_embeddings=False, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=64, encoder_ffn_dim=128,
        encoder_attention_heads=4, d_model=64, decoder_in_channels=[64, 64, 64], decoder_ffn_dim=128,
        decoder_attention_heads=4, decoder_layers=2, num_queries=20, num_denoising=10, anchor_image_size=[size, size],
    )
    processor = RTDetrImageProcessorPil(size={"height": size, "width": size})
    return RTDetrV2ForObjectDetection(config), processor
