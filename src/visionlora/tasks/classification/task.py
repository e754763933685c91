"""Image classification: any transformers image-classification model (ViT by default)."""

from __future__ import annotations

import functools
import inspect
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visionlora.core.drawing import draw_label
from visionlora.core.outputs import Option
from visionlora.core.plots import confusion_matrix_plot
from visionlora.data.cache import CachePlan
from visionlora.data.images import decode_all
from visionlora.data.records import LabelledImage, Part, SourceData
from visionlora.data.transforms import (
    TRAIN_CACHE_SCALE,
    Normalizer,
    RandomResizedCropFlip,
    chw,
    processor_output_size,
    processor_pixels,
    resize_for_training,
)
from visionlora.errors import VisionLoraError
from visionlora.metrics.classification import classification_metrics, confusion_matrix, per_class_rows
from visionlora.modeling.builtin import BuiltinModel
from visionlora.tasks.base import (
    Datasets,
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
from visionlora.tasks.classification.prelabels import LABEL_FORMATS
from visionlora.tasks.records import task_state
from visionlora.tasks.roles import TaskData, TaskModel, TaskPrediction, TaskReport, TaskSteps

TOP_K = 5
SCORE_FUNCTIONS = ("softmax", "sigmoid", "none")  # Hugging Face's function_to_apply: what turns logits into scores


def parse_top_k(text: str) -> int:
    """``top_k``: how many labels a prediction ranks, a whole number of 1 or more."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise VisionLoraError(f"top_k must be a whole number, not {text!r}") from None
    if value < 1:
        raise VisionLoraError(f"top_k must be 1 or more, not {value}")
    return value


def parse_score_function(text: str) -> str:
    """``function_to_apply``: softmax, sigmoid or none (the raw logits)."""
    if text not in SCORE_FUNCTIONS:
        raise VisionLoraError(f"function_to_apply must be one of {', '.join(SCORE_FUNCTIONS)}, not {text!r}")
    return text


def scores_of(logits: torch.Tensor, function: str) -> torch.Tensor:
    """Scores from ``logits`` (images x labels) by ``function`` (one of :data:`SCORE_FUNCTIONS`)."""
    if function == "sigmoid":
        return logits.sigmoid()
    return logits.softmax(dim=-1) if function == "softmax" else logits


IMBALANCE = 5  # a largest class more than this many times the smallest is reported


@dataclass
class ClassificationState(TaskState):
    """``--class-weights auto``: inverse class frequencies of the training set, n / (classes x n_class)."""

    class_weights: list[float] | None = None


class ClassificationData(TaskData):
    def split_group(self) -> Callable[[LabelledImage], str]:
        """Each class keeps its share in the validation split."""
        return _label_of

    def record_classes(self, record: LabelledImage) -> list[str]:
        return [record.label]

    def check_record(self, record: LabelledImage, image_size: tuple[int, int], labels: list[str]) -> list[str]:
        """A class the part's label list does not hold."""
        return [] if record.label in labels else [f"class {record.label!r} is not among {', '.join(labels)}"]

    def check_data(self, source: SourceData, held_out: list[Part], where: str) -> None:
        """At least two classes, every validation and test class known from training, no empty split."""
        if len(source.labels) < 2:
            found = ", ".join(repr(n) for n in source.labels) or "none"
            raise VisionLoraError(f"{where}: found one class ({found}); classification needs at least two")
        for part, name in zip(held_out, ("validation", "test")):
            unknown = sorted({r.label for r in part.records} - set(source.labels))
            if unknown:
                raise VisionLoraError(f"{part.where}: {name} classes not in training: {', '.join(unknown)}")
        super().check_data(source, held_out, where)

    def train_dataset(self, source: SourceData, processor, info: ModelInfo, cfg, cache: CachePlan):
        """Images a little larger than the model input, for random crops (or model-sized, without augmentation)."""
        if not cfg.augment:
            return self.eval_dataset(source.train, processor, info, cache)
        output_size = processor_output_size(processor)
        decoded = decode_all([r.source for r in source.train], lambda im, _: resize_for_training(im, output_size),
                             cache=cache, settings=f"classification-train|{output_size}")
        labels = [info.label2id[source.train[i].label] for i in decoded.kept]
        dataset = AugmentedImages(decoded.items, labels, output_size, cfg.seed)
        dataset.cache_report = decoded.report
        return dataset, decoded.skipped

    def eval_dataset(self, records: list[LabelledImage], processor, info: ModelInfo, cache: CachePlan | None = None):
        decoded = decode_all([r.source for r in records], lambda im, _: processor_pixels(processor, im),
                             cache=cache, settings=f"classification-eval|{processor.to_json_string()}")
        labels = [info.label2id[records[i].label] for i in decoded.kept]
        dataset = CachedImages(decoded.items, labels, decoded.kept)
        dataset.cache_report = decoded.report
        return dataset, decoded.skipped

    def image_bytes(self, processor, info: ModelInfo) -> int:
        height, width = processor_output_size(processor)
        return int(height * width * 3 * TRAIN_CACHE_SCALE**2)

    def make_datasets(self, source: SourceData, processor, info: ModelInfo, cfg) -> Datasets:
        """Also notes a class imbalance (largest class over IMBALANCE times the smallest)."""
        data = super().make_datasets(source, processor, info, cfg)
        per_class = data.counts["train_per_class"]
        present = {name: n for name, n in per_class.items() if n}
        largest, smallest = max(present, key=present.__getitem__), min(present, key=present.__getitem__)
        if present[largest] > IMBALANCE * present[smallest]:
            data.description.setdefault("notes", []).append(
                f"class imbalance: the largest class {largest!r} has {present[largest]} training images, the smallest "
                f"{smallest!r} {present[smallest]} ({present[largest] / present[smallest]:.1f}x); consider "
                "--class-weights auto or --balanced-sampler")
        return data

    def state_from_training_set(self, train, info: ModelInfo, cfg) -> ClassificationState:
        """With ``--class-weights auto``, the training set's inverse class frequencies."""
        if cfg.class_weights != "auto":
            return task_state(info, ClassificationState)
        per_class = self.count(train, "train", info)["train_per_class"]
        total = sum(per_class.values())
        weights = [total / (len(per_class) * n) if n else 0.0 for n in per_class.values()]
        return ClassificationState(class_weights=weights)

    def sample_weights(self, dataset) -> list[float]:
        counts = torch.bincount(torch.tensor(dataset.labels, dtype=torch.long)).double()
        return [1.0 / float(counts[label]) for label in dataset.labels]

    def count(self, dataset, split: str, info: ModelInfo) -> dict[str, Any]:
        per_class = torch.bincount(torch.tensor(dataset.labels, dtype=torch.long), minlength=len(info.labels))
        return {split: len(dataset), f"{split}_per_class": dict(zip(info.labels, per_class.tolist()))}


class ClassificationModel(TaskModel):
    def describe_model(self, model, processor, labels: list[str]) -> ModelFacts:
        """Ask ViT-like models to interpolate position embeddings when the input size changed."""
        native = getattr(model.config, "image_size", None)
        accepts = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        interpolate = accepts and native and list(processor_output_size(processor)) != [native, native]
        return ModelFacts({"interpolate_pos_encoding": True} if interpolate else {}, ClassificationState())

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """The linear layer(s) producing the class logits (``classifier`` on ViT)."""
        num_labels = cast(Any, model).config.num_labels
        heads = [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module.out_features == num_labels
        ]
        if not heads:
            raise VisionLoraError(f"{type(model).__name__}: no linear classification head with {num_labels} outputs")
        return heads[-1:]


class ClassificationSteps(TaskSteps):
    def loss_of_outputs(self, outputs, batch, info: ModelInfo) -> torch.Tensor:
        weights = task_state(info, ClassificationState).class_weights
        logits = outputs.logits
        return F.cross_entropy(logits.float(), batch["labels"],
                               weight=_weights_on(weights, logits.device) if weights else None)

    def eval_step(self, model, batch, processor, info: ModelInfo):
        logits = model(pixel_values=batch["pixel_values"], **info.forward_kwargs).logits.float()
        return F.cross_entropy(logits, batch["labels"]), list(logits.cpu())

    def metrics(self, dataset, indices, outputs, info: ModelInfo) -> dict[str, Any]:
        labels = torch.tensor([dataset.labels[i] for i in indices], dtype=torch.long)
        return classification_metrics(torch.stack(outputs), labels, info.labels)


class ClassificationPrediction(TaskPrediction):
    def hugging_face_answer(self, prediction, info: ModelInfo) -> list[dict[str, Any]]:
        """``[{"label", "score"}, ...]``, best first (``top_k`` and ``function_to_apply`` are options)."""
        return [{"label": ranked["label"], "score": ranked["score"]} for ranked in prediction["top_k"]]

    def predict_inputs(self, image, image_index, processor, info, options):
        return [PredictInput(image_index, Normalizer(processor)(processor_pixels(processor, image)))]

    def decode(self, outputs, inputs, images, processor, info: ModelInfo, options) -> list[dict]:
        return ranked_predictions(outputs.logits, info.labels, options.get("top_k") or TOP_K,
                                  options.get("function_to_apply") or "softmax")

    def draw(self, image: Image.Image, prediction: dict, info: ModelInfo) -> Image.Image:
        return draw_label(image, f"{prediction['label']} {prediction['score']:.2f}")

    def uncertainty(self, prediction: dict) -> float:
        """One minus the margin between the two best classes' scores."""
        scores = [float(ranked["score"]) for ranked in prediction["top_k"][:2]] + [0.0]
        return min(max(1.0 - (scores[0] - scores[1]), 0.0), 1.0)


class ClassificationReport(TaskReport):
    def diagnostics(self, dataset, indices, outputs, info: ModelInfo) -> Diagnostics:
        labels = torch.tensor([dataset.labels[i] for i in indices], dtype=torch.long)
        confusion = confusion_matrix(torch.stack(outputs).argmax(dim=1), labels, len(info.labels))
        return Diagnostics(per_class_rows(confusion, info.labels),
                           {"confusion_matrix.png": confusion_matrix_plot(confusion.numpy(), info.labels)})

    def ground_truth(self, record: LabelledImage, image, info: ModelInfo):
        return {"label": record.label, "score": 1.0}, {}

    def evaluated_predictions(self, dataset, indices, outputs, info: ModelInfo) -> dict[int, dict] | None:
        """The evaluation's logits are the predictions ``predict`` makes of the same pixels."""
        kept = getattr(dataset, "kept", None)
        if kept is None or not outputs:
            return None
        return {kept[i]: prediction for i, prediction in zip(indices, ranked_predictions(torch.stack(outputs),
                                                                                       info.labels))}

    def caption(self, prediction: dict[str, Any]) -> str:
        return f"{prediction['label']} {prediction['score']:.2f}"

    def out_of_sample_options(self, info: ModelInfo) -> dict[str, Any]:
        """Every label's probability."""
        return {"top_k": len(info.labels)}

    def label_issues(self, records: list[LabelledImage], predictions: list[dict[str, Any]],
                     info: ModelInfo) -> list[LabelIssue]:
        """cleanlab's confident learning on the out-of-sample probabilities: ``find_label_issues`` flags,
        ``get_label_quality_scores`` (the given label's self-confidence) ranks."""
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores

        probs = np.array([[_score_of(p, name) for name in info.labels] for p in predictions], dtype=np.float64)
        probs /= probs.sum(axis=1, keepdims=True)
        given = np.array([info.label2id[record.label] for record in records])
        flagged = find_label_issues(given, probs, filter_by="prune_by_noise_rate")
        scores = get_label_quality_scores(given, probs)
        return [LabelIssue(float(score), bool(flag), f"labelled {record.label!r}, predicted {prediction['label']!r} "
                           f"({prediction['score']:.2f}) by a model that never saw it")
                for record, prediction, score, flag in zip(records, predictions, scores, flagged)]


def ranked_predictions(logits: torch.Tensor, labels: list[str], top_k: int = TOP_K,
                       function: str = "softmax") -> list[dict[str, Any]]:
    """Each row of logits as a prediction: the top label and score, and the ``top_k`` best, scored by
    ``function`` (softmax, sigmoid or none)."""
    probs = scores_of(logits.float(), function).cpu()
    scores, indices = probs.topk(min(top_k, len(labels)), dim=-1)
    results = []
    for row_scores, row_indices in zip(scores.tolist(), indices.tolist()):
        ranked = [{"label": labels[i], "score": s} for s, i in zip(row_scores, row_indices)]
        results.append({"label": ranked[0]["label"], "score": ranked[0]["score"], "top_k": ranked})
    return results


def _score_of(prediction: dict[str, Any], label: str) -> float:
    """The score a prediction's ranking gives ``label`` (0 where it is not ranked)."""
    return next((ranked["score"] for ranked in prediction["top_k"] if ranked["label"] == label), 0.0)


def _label_of(record: LabelledImage) -> str:
    return record.label


@functools.lru_cache(maxsize=8)
def _weights_on_cached(weights: tuple[float, ...], device: str) -> torch.Tensor:
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _weights_on(weights: list[float], device: torch.device) -> torch.Tensor:
    """The class weights as a tensor on ``device``, made once per device rather than every step."""
    return _weights_on_cached(tuple(weights), str(device))


class ClassificationTask(Task):
    """Fine-tune an image classifier; the main metric is validation accuracy."""

    name = "classification"
    data_formats = ("huggingface", "imagefolder")
    preset = Preset(
        model="google/vit-base-patch16-224",
        lora_r=16,
        lora_alpha=32,
        target_modules=("query", "value"),
        lr_lora=2e-4,
        lr_full=5e-5,
    )
    builtin_models = (BuiltinModel("tiny", 32, "visionlora.tasks.classification.builtin:tiny_vit"),)
    demo = DemoRecipe("6 shapes the twin never saw (it learnt 12 others), 120 train / 60 val images",
                      "visionlora.examples.procedural:write_target_shapes",
                      {"per_class_train": 20, "per_class_val": 10}, model="tiny-pretrained", epochs=10,
                      settings={"full": {"lr": 5e-4}})
    main_metric = "accuracy"
    auto_class = "AutoModelForImageClassification"
    pipeline_tag = "image-classification"
    card_does = "classifies an image into one of"
    weighs_classes = True
    output_names = ("logits",)
    predict_batch = 32
    predict_options = (
        Option("top_k", f"labels ranked in each prediction's top_k (default {TOP_K})", parse_top_k, TOP_K, "K"),
        Option("function_to_apply", "scores from the logits by softmax (default), sigmoid or none (the logits)",
               parse_score_function, "softmax", "FUNCTION"),
    )
    label_formats = LABEL_FORMATS

    state_type = ClassificationState
    data_role = ClassificationData
    model_role = ClassificationModel
    steps_role = ClassificationSteps
    prediction_role = ClassificationPrediction
    report_role = ClassificationReport


class CachedImages(SeededDataset):
    """Decoded, already-resized uint8 pixels (3, H, W) and labels; ``kept``: each item's position
    among the records it was decoded from (the unreadable ones left out)."""

    def __init__(self, pixels: Sequence[torch.Tensor], labels: list[int], kept: list[int] | None = None):
        self.pixels, self.labels = pixels, labels
        self.kept = list(range(len(pixels))) if kept is None else kept

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index], "index": index}


class AugmentedImages(SeededDataset):
    """Cached uint8 images with a random resized crop and flip, seeded per (epoch, item)."""

    def __init__(self, images: Sequence[np.ndarray], labels: list[int], output_size, seed: int):
        self.images, self.labels = images, labels
        self.augment = RandomResizedCropFlip(output_size)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        crop = self.augment(self.images[index], rng=random.Random(self.item_seed(index)))
        return {"pixel_values": chw(crop), "labels": self.labels[index], "index": index}
