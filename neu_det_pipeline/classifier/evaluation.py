"""Accuracy, macro-F1, per-class report, mask IoU / Dice against the box masks, and the plots.

Mask IoU and Dice are per image (prediction thresholded at 0.5) and averaged over the images that have
a defect mask; defect-free images only count for classification.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)
from torchmetrics.functional.segmentation import dice_score, mean_iou

from neu_det_pipeline.classifier.data import ClassifierDataset
from neu_det_pipeline.classifier.model import AttentionGuidedClassifier
from neu_det_pipeline.io import atomic_write_bytes, atomic_write_text

MASK_THRESHOLD = 0.5


@dataclass
class Predictions:
    probabilities: torch.Tensor
    """[N, classes] softmax probabilities."""
    labels: torch.Tensor
    """[N] true labels."""
    mask_iou: torch.Tensor
    """Per-image IoU of the thresholded mask, for images with a non-empty true mask (empty without masks)."""
    mask_dice: torch.Tensor


@torch.no_grad()
def predict_dataset(
    model: AttentionGuidedClassifier, dataset: ClassifierDataset, batch_size: int, device: torch.device, autocast=None
) -> Predictions:
    """Run `model` over `dataset` (no augmentation) in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    probabilities, labels, ious, dices = [], [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        pixels = batch["pixels"].to(device)
        if autocast is not None:
            with autocast():
                out = model(pixels)
        else:
            out = model(pixels)
        probabilities.append(out.logits.float().softmax(1).cpu())
        labels.append(batch["labels"])
        if out.mask_logits is not None:
            has_mask = batch["masks"].flatten(1).amax(1) > 0
            predicted = (out.mask_logits.float().sigmoid().cpu() > MASK_THRESHOLD).long()[has_mask]
            target = batch["masks"].long()[has_mask]
            if len(target):
                ious.append(mean_iou(predicted, target, num_classes=1, per_class=True).flatten())
                dices.append(dice_score(predicted, target, num_classes=1, average="none").flatten())
    model.train(was_training)
    empty = torch.zeros(0)
    return Predictions(torch.cat(probabilities), torch.cat(labels), torch.cat(ious) if ious else empty, torch.cat(dices) if dices else empty)


def metrics(predictions: Predictions, classes: list[str], unit: str = "images") -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision / recall / F1 / support, confusion matrix, mask IoU and Dice;
    the sample count under `unit` (`images`, or `objects` for box crops, where every score is per object)."""
    preds, target, k = predictions.probabilities.argmax(1), predictions.labels, len(classes)
    per_class = {
        "precision": multiclass_precision(preds, target, k, average=None, zero_division=0),
        "recall": multiclass_recall(preds, target, k, average=None, zero_division=0),
        "f1": multiclass_f1_score(preds, target, k, average=None, zero_division=0),
    }
    support = torch.bincount(target, minlength=k)
    has_masks = len(predictions.mask_iou) > 0
    return {
        unit: len(target),
        "accuracy": multiclass_accuracy(preds, target, k, average="micro").item(),
        "macro_f1": multiclass_f1_score(preds, target, k, average="macro", zero_division=0).item(),
        "mask_iou": predictions.mask_iou.mean().item() if has_masks else None,
        "mask_dice": predictions.mask_dice.mean().item() if has_masks else None,
        "per_class": {
            name: {**{key: values[i].item() for key, values in per_class.items()}, "support": support[i].item()}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": multiclass_confusion_matrix(preds, target, k).tolist(),
    }


def report_table(result: dict[str, Any], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in result["per_class"].items():
        table.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    return table


def score_line(result: dict[str, Any]) -> str:
    masks = f", mask IoU {result['mask_iou']:.3f}, Dice {result['mask_dice']:.3f}" if result["mask_iou"] is not None else ""
    per_object = f"{result['objects']} objects: per-object " if "objects" in result else ""
    return f"{per_object}accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}{masks}"


def write_history_csv(history: list[dict[str, Any]], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    return atomic_write_text(path, buffer.getvalue())


def _save_figure(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """Training losses and validation accuracy / macro-F1 / mask IoU per epoch."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 3.5), layout="tight")
    losses, scores = figure.subplots(1, 2)
    for key in ("train_loss", "train_classification_loss", "train_segmentation_loss"):
        losses.plot(epochs, [row[key] for row in history], label=key.removeprefix("train_"))
    losses.set(xlabel="epoch", ylabel="loss", title="training losses")
    losses.legend()
    for key in ("val_accuracy", "val_macro_f1", "val_mask_iou"):
        values = [row[key] for row in history]
        if all(v is not None and v != "" for v in values):
            scores.plot(epochs, values, label=key.removeprefix("val_"))
    scores.set(xlabel="epoch", ylim=(0, 1.02), title="validation")
    scores.legend()
    for axes in (losses, scores):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save_figure(figure, path)


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path, title: str) -> Path:
    from matplotlib.figure import Figure

    size = 1.2 + 0.7 * len(classes)
    figure = Figure(figsize=(size + 1, size), layout="tight")
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axes.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set(xlabel="predicted", ylabel="true", title=title)
    return _save_figure(figure, path)
