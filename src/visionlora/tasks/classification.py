"""Image classification: any transformers image-classification model (ViT by default)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visionlora.data.images import decode_all
from visionlora.data.imagefolder import (
    VAL_DIRS,
    ClassificationData,
    LabelledImage,
    first_child,
    is_hf_dataset_folder,
    read_class_folders,
    read_classification_data,
)
from visionlora.data.transforms import (
    Normalizer,
    RandomResizedCropFlip,
    processor_output_size,
    processor_pixels,
    processor_size,
    resize_for_training,
    set_processor_size,
)
from visionlora.errors import VisionLoraError
from visionlora.metrics.classification import classification_metrics
from visionlora.models import load_pretrained
from visionlora.tasks.base import Datasets, ModelInfo, Preset
from visionlora.visualize import draw_label

TINY_IMAGE_SIZE = 32
PREDICT_BATCH = 32


class ClassificationTask:
    """Fine-tune an image classifier; the main metric is validation accuracy."""

    name = "classification"
    preset = Preset(
        model="google/vit-base-patch16-224",
        lora_r=16,
        lora_alpha=32,
        target_modules=("query", "value"),
        lr_lora=2e-4,
        lr_full=5e-5,
    )
    main_metric = "accuracy"
    greater_is_better = True

    # -- data -------------------------------------------------------------------------
    def read_data(self, cfg) -> ClassificationData:
        return read_classification_data(cfg.data, cfg.val_data, cfg.seed, cfg.holdout())

    def make_datasets(self, source: ClassificationData, processor, info: ModelInfo, cfg) -> Datasets:
        output_size = processor_output_size(processor)
        train = decode_all([r.source for r in source.train], lambda im, _: resize_for_training(im, output_size))
        val = decode_all([r.source for r in source.val], lambda im, _: processor_pixels(processor, im))
        label2id = info.label2id
        train_labels = [label2id[source.train[i].label] for i in train.kept]
        val_labels = [label2id[source.val[i].label] for i in val.kept]
        if not train.items:
            raise VisionLoraError(f"{source.description.get('train', cfg.data)}: no readable training images")
        if not val.items:
            raise VisionLoraError(f"{source.description.get('val', cfg.data)}: no readable validation images")
        normalizer = Normalizer(processor)
        counts = {
            "train": len(train.items),
            "val": len(val.items),
            "train_per_class": _per_class(train_labels, info.labels),
            "val_per_class": _per_class(val_labels, info.labels),
        }
        return Datasets(
            train=AugmentedImages(train.items, train_labels, normalizer, output_size, cfg.seed)
            if cfg.augment
            else CachedImages([_square(im, processor) for im in train.items], train_labels, normalizer),
            val=CachedImages(val.items, val_labels, normalizer),
            counts=counts,
            skipped=source.skipped + train.skipped + val.skipped,
            description=source.description,
        )

    def make_eval_dataset(self, data: str, processor, info: ModelInfo):
        """Labelled images for ``evaluate``: the val split of ``data``, else all of it."""
        path = Path(data)
        if path.is_dir() and not is_hf_dataset_folder(path):
            records, skipped = read_class_folders(first_child(path, VAL_DIRS) or path)
        else:
            records, skipped = _hf_eval_records(data)
        unknown = sorted({r.label for r in records} - set(info.labels))
        if unknown:
            raise VisionLoraError(f"{data}: classes the model was not trained on: {', '.join(unknown)}")
        decoded = decode_all([r.source for r in records], lambda im, _: processor_pixels(processor, im))
        labels = [info.label2id[records[i].label] for i in decoded.kept]
        return CachedImages(decoded.items, labels, Normalizer(processor)), skipped + decoded.skipped

    # -- model ------------------------------------------------------------------------
    def build_model(self, model_ref: str, labels: list[str], image_size: int | None):
        id2label = dict(enumerate(labels))
        label2id = {name: i for i, name in id2label.items()}
        if model_ref == "tiny":
            model, processor = _tiny_vit(len(labels), id2label, label2id, image_size or TINY_IMAGE_SIZE)
        else:
            from transformers import AutoModelForImageClassification

            model, processor = load_pretrained(
                AutoModelForImageClassification,
                model_ref,
                num_labels=len(labels),
                id2label=id2label,
                label2id=label2id,
            )
            if image_size:
                set_processor_size(processor, image_size)
        info = ModelInfo(
            task=self.name,
            mode="",
            base_model=model_ref,
            labels=list(labels),
            image_size=processor_size(processor),
            forward_kwargs=_forward_kwargs(model, processor),
        )
        return model, processor, info

    def load_model(self, path: str, info: ModelInfo) -> torch.nn.Module:
        from transformers import AutoModelForImageClassification

        model, _ = load_pretrained(
            AutoModelForImageClassification,
            path,
            with_processor=False,
            num_labels=len(info.labels),
            id2label=info.id2label,
            label2id=info.label2id,
        )
        return model

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """The linear layer(s) producing the class logits (``classifier`` on ViT)."""
        num_labels = model.config.num_labels
        heads = [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module.out_features == num_labels
        ]
        if not heads:
            raise VisionLoraError(f"{type(model).__name__}: no linear classification head with {num_labels} outputs")
        return heads[-1:]

    # -- steps ------------------------------------------------------------------------
    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "labels": torch.tensor([item["labels"] for item in items], dtype=torch.long),
        }

    def loss(self, model, batch, info: ModelInfo) -> torch.Tensor:
        return model(pixel_values=batch["pixel_values"], labels=batch["labels"], **info.forward_kwargs).loss

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator, info: ModelInfo) -> dict[str, Any]:
        model.eval()
        all_logits, all_labels = [], []
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"], **info.forward_kwargs).logits
            logits, labels = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
        logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        metrics = {"loss": float(F.cross_entropy(logits, labels))}
        metrics.update(classification_metrics(logits, labels, info.labels))
        return metrics

    @torch.no_grad()
    def predict(self, model, processor, images: Sequence[Image.Image], info: ModelInfo, **_: Any) -> list[dict]:
        model.eval()
        normalizer = Normalizer(processor)
        device = next(model.parameters()).device
        top_k = min(5, len(info.labels))
        results = []
        for start in range(0, len(images), PREDICT_BATCH):
            chunk = images[start : start + PREDICT_BATCH]
            pixels = torch.stack([normalizer(processor_pixels(processor, im)) for im in chunk]).to(device)
            probs = model(pixel_values=pixels, **info.forward_kwargs).logits.float().softmax(dim=-1).cpu()
            scores, indices = probs.topk(top_k, dim=-1)
            for row_scores, row_indices in zip(scores.tolist(), indices.tolist()):
                ranked = [{"label": info.labels[i], "score": s} for s, i in zip(row_scores, row_indices)]
                results.append({"label": ranked[0]["label"], "score": ranked[0]["score"], "top_k": ranked})
        return results


    def draw(self, image: Image.Image, prediction: dict, info: ModelInfo) -> Image.Image:
        return draw_label(image, f"{prediction['label']} {prediction['score']:.2f}")


class CachedImages(torch.utils.data.Dataset):
    """Decoded, already-resized uint8 pixels and labels; normalised on access."""

    def __init__(self, pixels: list[torch.Tensor], labels: list[int], normalizer: Normalizer):
        self.pixels, self.labels, self.normalizer = pixels, labels, normalizer

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.normalizer(self.pixels[index]), "labels": self.labels[index]}


class AugmentedImages(torch.utils.data.Dataset):
    """Cached uint8 images with random resized crop and flip.

    The augmentation of item ``i`` in epoch ``e`` depends only on (seed, e, i), so runs
    are reproducible whatever the number of workers, and a resumed run matches.
    """

    def __init__(self, images, labels, normalizer: Normalizer, output_size, seed: int):
        self.images, self.labels, self.normalizer = images, labels, normalizer
        self.augment = RandomResizedCropFlip(output_size)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        crop = self.augment(self.images[index], seed=hash((self.seed, self.epoch, index)))
        return {"pixel_values": self.normalizer.from_hwc(crop), "labels": self.labels[index]}


def _square(image: np.ndarray, processor) -> torch.Tensor:
    """A cached training image brought to the model input (for runs without augmentation)."""
    return processor_pixels(processor, Image.fromarray(image))


def _per_class(labels: list[int], names: list[str]) -> dict[str, int]:
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=len(names)).tolist()
    return dict(zip(names, counts))


def _hf_eval_records(data: str) -> tuple[list[LabelledImage], list[dict]]:
    from visionlora.data.hf_datasets import read_hf_classification

    source = read_hf_classification(data)
    return (source.val or source.train), source.skipped


def _tiny_vit(num_labels: int, id2label, label2id, image_size: int):
    """A 2-layer, 64-wide ViT on an 8x8 patch grid with random weights: offline, seconds to train."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    if image_size % 8:
        raise VisionLoraError(f"--image-size {image_size}: the tiny ViT needs a multiple of 8")
    config = ViTConfig(
        num_labels=num_labels,
        id2label=id2label,
        label2id=label2id,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=image_size,
        patch_size=image_size // 8,  # an 8x8 grid of patches at any size
    )
    processor = ViTImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return ViTForImageClassification(config), processor


def _forward_kwargs(model, processor) -> dict[str, Any]:
    """Ask ViT-like models to interpolate position embeddings when the input size changed."""
    native = getattr(model.config, "image_size", None)
    accepts = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    if accepts and native and list(processor_output_size(processor)) != [native, native]:
        return {"interpolate_pos_encoding": True}
    return {}
