"""Classification metrics as pure functions of logits and labels."""

from __future__ import annotations

import torch


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """Accuracy, top-5 (more than 5 classes), macro-F1 and per-class accuracy.

    ``logits`` is (N, C), ``labels`` is (N,). Macro-F1 averages over the classes that
    occur in the labels or the predictions (scikit-learn's ``f1_score(average="macro",
    zero_division=0)``); the per-class table lists the classes that occur in the labels.
    """
    num_classes = len(class_names)
    predicted = logits.argmax(dim=1)
    metrics: dict = {"accuracy": _mean(predicted == labels)}
    if num_classes > 5:
        top5 = logits.topk(5, dim=1).indices
        metrics["top5_accuracy"] = _mean((top5 == labels[:, None]).any(dim=1))
    confusion = confusion_matrix(predicted, labels, num_classes)
    true_positive = confusion.diag().double()
    support = confusion.sum(dim=1).double()
    predicted_count = confusion.sum(dim=0).double()
    precision = torch.where(predicted_count > 0, true_positive / predicted_count.clamp(min=1), torch.zeros(()))
    recall = torch.where(support > 0, true_positive / support.clamp(min=1), torch.zeros(()))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros(()))
    present = support > 0
    occurring = present | (predicted_count > 0)
    metrics["macro_f1"] = float(f1[occurring].mean()) if occurring.any() else 0.0
    metrics["per_class_accuracy"] = {
        name: float(recall[i]) for i, name in enumerate(class_names) if present[i]
    }
    return metrics


def _mean(flags: torch.Tensor) -> float:
    return float(flags.float().mean()) if flags.numel() else 0.0


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    return confusion


def per_class_rows(confusion: torch.Tensor, class_names: list[str]) -> list[dict]:
    """One row per class: images, precision, recall (= per-class accuracy) and F1."""
    rows = []
    for index, name in enumerate(class_names):
        hits, support, predicted = (int(confusion[index, index]), int(confusion[index].sum()),
                                    int(confusion[:, index].sum()))
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else None
        f1 = 2 * precision * recall / (precision + recall) if recall and precision + recall > 0 else 0.0
        rows.append({"class": name, "images": support, "precision": round(precision, 6),
                     "recall": None if recall is None else round(recall, 6), "f1": round(f1, 6)})
    return rows
