"""Concept metrics: physical attribution (per-concept accuracy, AUROC, error in the unit), leakage, the head's rule.

The intervention gain is :class:`~pellucid.training.concepts.interventions.InterventionCurve`'s ``gain`` (one
computation).

Every metric is a torchmetrics ``Metric`` (it synchronises across DDP processes). Missing annotations (NaN in the
batch's ``concepts``) are left out of every concept metric.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc

from pellucid.models.concepts import ConceptSpec
from pellucid.training.metrics import probabilities


def _unit_suffix(unit: str | None) -> str:
    """``"mm"`` -> ``"_mm"``, ``"a.u."`` -> ``"_au"``, ``None`` -> ``""`` (metric names stay plain identifiers)."""
    cleaned = re.sub(r"[^0-9A-Za-z]+", "", unit or "")
    return f"_{cleaned}" if cleaned else ""


class ConceptMetrics(Metric):
    """Per-concept quality: accuracy and AUROC of binary concepts, mean absolute error of continuous ones.

    ``update(concept_logits, targets)`` takes the model's (B, M) ``concept_logits`` (logit for binary, value in the
    unit for continuous concepts) and the batch's (B, M) ``concepts`` (NaN = not annotated). ``compute()`` returns:

    - ``<name>/accuracy`` and ``<name>/auroc`` per binary concept (a logit > 0 counts as present; AUROC is NaN
      when only one class was annotated),
    - ``<name>/mae_<unit>`` per continuous concept, in its unit (``diameter_mm/mae_mm``),
    - ``binary_accuracy`` and ``binary_auroc``: means over the binary concepts (NaN ignored).

    A concept with no annotation at all reports NaN.

    Args:
        concepts: The concept specifications, in column order.
    """

    full_state_update = False
    higher_is_better = None  # accuracy and AUROC rise, errors fall

    def __init__(self, concepts: Sequence[ConceptSpec], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not concepts:
            raise ValueError("ConceptMetrics: expected at least one concept specification")
        self.concept_specs = list(concepts)
        self.add_state("predictions", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, concept_logits: Tensor, targets: Tensor) -> None:
        """Add (B, M) predictions and (B, M) targets (NaN = not annotated)."""
        expected = (concept_logits.shape[0], len(self.concept_specs))
        for name, value in (("concept_logits", concept_logits), ("targets", targets)):
            if tuple(value.shape) != expected:
                raise ValueError(f"ConceptMetrics: {name} expected shape {expected} (concepts "
                                 f"{[s.name for s in self.concept_specs]}), got {tuple(value.shape)}")
        self.predictions.append(concept_logits.detach().float())
        self.targets.append(targets.detach().float())

    def compute(self) -> dict[str, Tensor]:
        """Per-concept and mean metrics (see the class docstring)."""
        predictions = _concatenated(self.predictions)
        targets = _concatenated(self.targets)
        nan = torch.tensor(float("nan"))
        results: dict[str, Tensor] = {}
        accuracies, aurocs = [], []
        for column, spec in enumerate(self.concept_specs):
            annotated = ~torch.isnan(targets[:, column])
            predicted, truth = predictions[annotated, column], targets[annotated, column]
            if spec.kind == "binary":
                present = truth >= 0.5
                accuracy = ((predicted > 0) == present).float().mean() if truth.numel() else nan
                both_classes = bool(present.any()) and bool((~present).any())
                auroc = binary_auroc(torch.sigmoid(predicted), present.long()) if both_classes else nan
                results[f"{spec.name}/accuracy"], results[f"{spec.name}/auroc"] = accuracy.float(), auroc.float()
                accuracies.append(accuracy)
                aurocs.append(auroc)
            else:
                error = (predicted - truth).abs().mean() if truth.numel() else nan
                results[f"{spec.name}/mae{_unit_suffix(spec.unit)}"] = error.float()
        if accuracies:
            results["binary_accuracy"] = torch.nanmean(torch.stack(accuracies).float())
            results["binary_auroc"] = torch.nanmean(torch.stack(aurocs).float())
        return results


def _concatenated(state: list[Tensor] | Tensor) -> Tensor:
    return torch.cat(state) if isinstance(state, list) else state


def hard_concept_values(concept_logits: Tensor, concepts: Sequence[ConceptSpec]) -> Tensor:
    """(B, M) intervention values that harden the predictions: binary concepts to 0/1, continuous ones unchanged."""
    is_binary = torch.tensor([s.kind == "binary" for s in concepts], device=concept_logits.device)
    return torch.where(is_binary, (concept_logits > 0).to(concept_logits.dtype), concept_logits)


@torch.no_grad()
def soft_and_hard_logits(model: nn.Module, image: Tensor) -> tuple[Tensor, Tensor]:
    """Class logits from the model's soft concepts, and from the same concepts hardened (binary ones to 0/1).

    A large accuracy drop from soft to hard means the head reads information the concept probabilities leak
    beyond "present/absent" (Mahinpei et al., "Promises and Pitfalls of Black-Box Concept Learning Models", 2021).
    """
    soft = model(image, explain=False)
    values = hard_concept_values(soft.concept_logits, model.concept_specs)
    mask = torch.ones_like(values, dtype=torch.bool)
    hard = model(image, explain=False, concept_mask=mask, concept_values=values)
    return soft.logits, hard.logits


class LeakageCheck(Metric):
    """Task accuracy from soft versus hard (thresholded) concepts.

    ``compute()`` returns ``soft_accuracy``, ``hard_accuracy`` and ``leakage_gap`` (soft minus hard).
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("soft_correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hard_correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, soft_logits: Tensor, hard_logits: Tensor, label: Tensor) -> None:
        """Add (B, K) logits from soft and from hard concepts and the (B,) class labels."""
        if soft_logits.shape != hard_logits.shape or label.shape != soft_logits.shape[:1]:
            raise ValueError(f"LeakageCheck: expected soft and hard logits (B, K) and label (B,), got "
                             f"{tuple(soft_logits.shape)}, {tuple(hard_logits.shape)}, {tuple(label.shape)}")
        self.soft_correct += (soft_logits.argmax(dim=1) == label).sum()
        self.hard_correct += (hard_logits.argmax(dim=1) == label).sum()
        self.total += label.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """Soft and hard accuracy and their gap."""
        total = self.total.clamp_min(1)
        soft, hard = self.soft_correct / total, self.hard_correct / total
        return {"soft_accuracy": soft.float(), "hard_accuracy": hard.float(), "leakage_gap": (soft - hard).float()}


def head_rule_agreement(model: nn.Module, image: Tensor, true_concepts: Tensor, rule_labels: Tensor) -> Tensor:
    """Share of samples where the model, with every concept set to its TRUE value, agrees with a reference rule.

    For a concept bottleneck the label then depends on the label head alone, so this measures how well the learned
    head reproduces the rule; for a concept embedding model the embeddings still depend on the image. Samples with
    a NaN concept are left out (the rule needs every concept).

    Args:
        model: A concept model.
        image: (B, C, *S) images.
        true_concepts: (B, M) true concept values in their units.
        rule_labels: (B,) the rule's class for each sample's true concepts.
    """
    complete = ~torch.isnan(true_concepts).any(dim=1)
    if not bool(complete.any()):
        return torch.tensor(float("nan"))
    concepts, rule_labels = true_concepts[complete], rule_labels.to(true_concepts.device)
    with torch.no_grad():
        output = model(image[complete], explain=False, concept_mask=torch.ones_like(concepts, dtype=torch.bool),
                       concept_values=concepts)
    predicted = probabilities(output.logits, "multiclass").argmax(dim=1)
    return (predicted == rule_labels[complete].to(predicted.device)).float().mean()


def concept_auroc(scores: Tensor, targets: Tensor) -> float | None:
    """AUROC of 1-D ``scores`` for 0/1 ``targets`` (torchmetrics'; ties count half); ``None`` with one class only."""
    positive = targets >= 0.5
    if bool(positive.all()) or not bool(positive.any()):
        return None
    return float(binary_auroc(scores.float(), positive.long()))
