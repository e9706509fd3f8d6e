"""Task metrics as torchmetrics ``Metric``s (they synchronise across DDP processes by themselves)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassRecall,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelStatScores,
)
from torchmetrics.segmentation import DiceScore, MeanIoU
from torchmetrics.utilities import dim_zero_cat

from pellucid.training.data.base import Task
from pellucid.training.elements.registry import PERFORMANCE, register_metric

register_metric("accuracy", PERFORMANCE, "Share of correct predictions: argmax class (multi-class), or (sample, "
                "label) pairs right at probability 0.5 (multi-label, micro-averaged).", None, True)
register_metric("balanced_accuracy", PERFORMANCE, "Mean over classes of the recall (multi-class), or mean over labels "
                "of (sensitivity + specificity) / 2 (multi-label).", None, True)
register_metric("auroc", PERFORMANCE, "Area under the ROC curve of the class probabilities, macro-averaged over "
                "the classes (one-vs-rest) or labels that have both positive and negative samples in the split; "
                "undefined (NaN) when none has.", None, True)
register_metric("dice", PERFORMANCE, "Dice overlap of the predicted and true segmentation over the foreground "
                "classes, pooled over every pixel/voxel of the split.", None, True)
register_metric("iou", PERFORMANCE, "Intersection over union of the predicted and true segmentation, mean over the "
                "foreground classes.", None, True)


class MultilabelBalancedAccuracy(MultilabelStatScores):
    """Mean over labels of (sensitivity + specificity) / 2.

    A label with no positives (or no negatives) in the data counts only the half that is defined.
    """

    def __init__(self, num_labels: int, threshold: float = 0.5, **kwargs: object) -> None:
        super().__init__(num_labels=num_labels, threshold=threshold, average="none", **kwargs)

    def compute(self) -> Tensor:
        """Balanced accuracy averaged over labels."""
        tp, fp, tn, fn = self._final_state()
        tp, fp, tn, fn = (s.to(torch.float64) for s in (tp, fp, tn, fn))
        sensitivity = tp / (tp + fn)
        specificity = tn / (tn + fp)
        per_label = torch.nanmean(torch.stack([sensitivity, specificity]), dim=0)
        return torch.nanmean(per_label).to(torch.float32)


class _DefinedAUROC:
    """Macro AUROC over the classes (labels) the split defines it for; NaN, not 0, when it defines it for none.

    torchmetrics scores a class without positives (or negatives) as 0 and averages it in, so a split holding one
    class reported "auroc 0.000". Mixed into the multi-class and multi-label AUROC (``average="none"``, exact).
    """

    def compute(self) -> Tensor:
        """Mean AUROC over the defined classes, NaN when there is none."""
        target = dim_zero_cat(self.target)
        positives = (target.view(-1, 1) == torch.arange(self.num_classes, device=target.device)) if target.ndim == 1 \
            else target.bool()
        defined = positives.any(dim=0) & (~positives).any(dim=0)
        if not bool(defined.any()):
            return torch.tensor(float("nan"))
        with warnings.catch_warnings():  # the undefined classes' "no positive samples" warnings: excluded below
            warnings.simplefilter("ignore")
            per_class = super().compute()
        return per_class[defined].mean()


class DefinedMulticlassAUROC(_DefinedAUROC, MulticlassAUROC):
    """Multi-class macro AUROC over the classes present in the split (see :class:`_DefinedAUROC`)."""

    def __init__(self, num_classes: int, **kwargs: object) -> None:
        super().__init__(num_classes=num_classes, average="none", **kwargs)


class DefinedMultilabelAUROC(_DefinedAUROC, MultilabelAUROC):
    """Multi-label macro AUROC over the labels with positives and negatives (see :class:`_DefinedAUROC`)."""

    def __init__(self, num_labels: int, **kwargs: object) -> None:
        super().__init__(num_labels=num_labels, average="none", **kwargs)
        self.num_classes = num_labels


def task_metrics(task: Task, num_classes: int, prefix: str, auroc: bool = True) -> MetricCollection:
    """Task metrics: classification or segmentation.

    Classification (``multiclass``, ``multilabel``): accuracy, balanced accuracy and macro AUROC; they take
    probabilities (softmax / sigmoid) and the batch's ``label``. Multi-class balanced accuracy is the
    macro-averaged recall. Segmentation: Dice and IoU over the foreground classes, pooled over every pixel of
    the epoch; they take predicted and true class-index maps (B, *S).

    Args:
        task: ``"multiclass"`` or ``"multilabel"``.
        num_classes: ``K`` (>= 2 for multi-class).
        prefix: Prepended to every metric name (``"val/"``).
        auroc: Include AUROC (it keeps every prediction of the epoch; training metrics leave it out).
    """
    if task == "multiclass":
        if num_classes < 2:
            raise ValueError(f"multiclass task needs num_classes >= 2, got {num_classes}")
        metrics = {
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "balanced_accuracy": MulticlassRecall(num_classes, average="macro"),
            "auroc": DefinedMulticlassAUROC(num_classes),
        }
    elif task == "segmentation":
        if num_classes < 2:
            raise ValueError(f"segmentation task needs num_classes >= 2 (background included), got {num_classes}")
        metrics = {
            "dice": DiceScore(num_classes, include_background=False, input_format="index", aggregation_level="global"),
            "iou": MeanIoU(num_classes, include_background=False, input_format="index"),
        }
        return MetricCollection(metrics, prefix=prefix)
    elif task == "multilabel":
        metrics = {
            "accuracy": MultilabelAccuracy(num_classes, average="micro"),
            "balanced_accuracy": MultilabelBalancedAccuracy(num_classes),
            "auroc": DefinedMultilabelAUROC(num_classes),
        }
    else:
        raise ValueError(f"task must be 'multiclass', 'multilabel' or 'segmentation', got {task!r}")
    if not auroc:
        metrics.pop("auroc")
    return MetricCollection(metrics, prefix=prefix)


def probabilities(logits: Tensor, task: Task) -> Tensor:
    """Class probabilities from logits: softmax (multi-class) or sigmoid (multi-label)."""
    return logits.softmax(dim=1) if task == "multiclass" else logits.sigmoid()
