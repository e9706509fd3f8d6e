"""The families' own evaluation tools, fed from the five-element evaluator through the explanation protocol.

A tool applies when the model implements the protocol method it needs (see
:class:`~pellucid.models.InterpretableModel`); a model that keeps the default (``None``) simply gets no such metric.

- Prototype networks (:mod:`pellucid.training.elements.visual_recognizability`): patch purity (PIP-Net), k-NN class
  purity, prototype activation precision, consistency and stability, through ``PrototypeEvaluation``; needs
  ``prototype_classes()`` and ``prototype_maps``. Duplicate sources (prototypes showing a patch another one shows)
  from ``prototype_provenance()``.
- Concept models (:mod:`pellucid.training.elements.physical_attribution`): per-concept accuracy, AUROC and error
  in the unit through ``ConceptMetrics``; (:mod:`pellucid.training.concepts.interventions`): intervention curves by
  policy (most uncertain concept first, random order) for models whose ``accepts_interventions()`` is true and
  that set ``concept_specs``.
- Prototype provenance (``prototype_provenance()``) for the writer, and the prototype gallery
  (:mod:`pellucid.training.prototypes.gallery`, prototype networks) for the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from pellucid.models import ConceptSpec, InterpretableModel, ModelOutput
from pellucid.training.concepts import interventions
from pellucid.training.elements.actionability import accepts_interventions
from pellucid.training.elements.physical_attribution import ConceptMetrics
from pellucid.training.elements.results import Curve, MetricResult
from pellucid.training.elements.visual_recognizability import PrototypeEvaluation, duplicate_sources

INTERVENTION_POLICIES = ("uncertainty", "random")


def prototype_classes(model: nn.Module) -> Tensor | None:
    """(P,) class of each prototype through the protocol; ``None`` for a model without class-specific prototypes."""
    return model.prototype_classes() if isinstance(model, InterpretableModel) else None


def prototype_provenance(model: nn.Module) -> list[dict[str, Any] | None] | None:
    """One provenance entry (or ``None``) per prototype through the protocol; ``None`` for a model without."""
    return model.prototype_provenance() if isinstance(model, InterpretableModel) else None


def concept_specs(model: nn.Module) -> list[ConceptSpec] | None:
    """The concepts the model predicts, through the protocol; ``None`` for a model without concepts."""
    return model.concept_specs if isinstance(model, InterpretableModel) else None


def prototype_gallery(model: nn.Module, dataset: Callable[[], Any], class_names: Sequence[str] | None,
                      count: int = 6) -> Figure | None:
    """The source patches of the first ``count`` prototypes with a source (push's, or found for PIP-Net), else ``None``.

    ``None`` too when no prototype was pushed yet, or when ``dataset`` does not hold the source images (a report on
    other data than the model was trained on: the recorded indices point at other images there).

    Args:
        model: The model.
        dataset: Returns the dataset push read (called only when a gallery can be drawn).
        class_names: Class names.
        count: Prototypes shown.
    """
    provenance = prototype_provenance(model)
    if provenance is None or prototype_classes(model) is None:
        return None
    pushed = [index for index, source in enumerate(provenance) if source is not None]
    if not pushed:
        return None
    data = dataset()
    held = [p for p in pushed if provenance[p]["sample_index"] < len(data)
            and data[provenance[p]["sample_index"]]["id"] == provenance[p]["sample_id"]][:count]
    if not held:
        return None
    from pellucid.training.prototypes import gallery as gallery  # matplotlib's Agg backend only once drawn

    entries = gallery.build_gallery(model, data, None, class_names, prototypes=held)
    return gallery.gallery_figure(entries)


# ---------------------------------------------------------------------------------------------- metrics
class FamilyMetrics(nn.Module):
    """The families' own metrics, fed from the five-element evaluator batch by batch.

    Args:
        concept_specs: The model's concepts (column order of ``concept_logits``).
        seed: Seed of the random intervention order.
    """

    def __init__(self, concept_specs: Sequence[ConceptSpec] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.concept_specs = list(concept_specs or [])
        self.seed = seed
        self.concepts = ConceptMetrics(self.concept_specs) if self.concept_specs else None
        self.curves = nn.ModuleDict()
        self.prototypes: PrototypeEvaluation | None = None
        self.duplicate_sources: int | None = None
        self._batches = 0

    def reset(self) -> None:
        """Forget every batch."""
        if self.concepts is not None:
            self.concepts.reset()
        for curve in self.curves.values():
            curve.reset()
        self.prototypes = None  # a fresh PrototypeEvaluation starts with the next batch
        self.duplicate_sources = None
        self._batches = 0

    @torch.no_grad()
    def update(self, model: nn.Module, output: ModelOutput, batch: Mapping[str, Any], true_concepts: Tensor | None,
               intervene: bool) -> None:
        """Feed one batch (``true_concepts`` in the model's concept order, NaN where unknown)."""
        if self._batches == 0:  # a property of the model, not of the data: read once
            provenance = prototype_provenance(model)
            self.duplicate_sources = None if provenance is None else duplicate_sources(provenance)
        if output.prototype_maps is not None and prototype_classes(model) is not None:
            if self.prototypes is None:
                self.prototypes = PrototypeEvaluation()
            self.prototypes.update(model, output, batch, self._batches)
        if self.concepts is not None and output.concept_logits is not None and true_concepts is not None \
                and output.concept_logits.shape[1] == len(self.concept_specs):
            self.concepts.to(output.concept_logits.device).update(output.concept_logits, true_concepts)
        label = batch.get("label")
        specs = concept_specs(model)
        if intervene and true_concepts is not None and label is not None and label.ndim == 1 \
                and accepts_interventions(model) and specs:
            generator = torch.Generator().manual_seed(self.seed + self._batches)
            for policy in INTERVENTION_POLICIES:
                if policy not in self.curves:
                    self.curves[policy] = interventions.InterventionCurve(interventions.num_steps(policy, specs))
                logits = interventions.intervention_logits(model, batch["image"], true_concepts, policy, 1, generator)
                self.curves[policy].to(logits.device).update(logits, label)
        self._batches += 1

    def compute(self) -> tuple[list[MetricResult], list[Curve]]:
        """The families' metrics as extra :class:`MetricResult` rows and curves."""
        metrics: list[MetricResult] = []
        curves: list[Curve] = []
        if self.prototypes is not None:
            for name, value in self.prototypes.results().items():
                metrics.append(MetricResult.of(f"prototype_{name}", _finite(value)))
        if self.duplicate_sources is not None:
            metrics.append(MetricResult.of("duplicate_prototype_sources", float(self.duplicate_sources)))
        if self.concepts is not None and self.concepts.update_called:
            for name, value in self.concepts.compute().items():
                # pooled numbers and errors in the unit duplicate the evaluator's concept_accuracy, concept_auroc and
                # concept_mae/<concept>: one registered metric each
                if "/" not in name or "/mae" in name:
                    continue
                metrics.append(MetricResult.of(f"concept/{name}", _finite(float(value))))
        for policy, curve in self.curves.items():
            if not curve.update_called:
                continue
            result = curve.compute()
            accuracy = result["accuracy"].tolist()
            curves.append(Curve(f"intervention_{policy}", "actionability", list(range(len(accuracy))), accuracy,
                                "concepts set to their true value", "accuracy"))
            metrics.append(MetricResult.of(f"intervention_auc_{policy}", _finite(float(result["auc"]))))
            if not any(m.name == "intervention_gain" for m in metrics):  # every policy ends with all concepts set
                metrics.append(MetricResult.of("intervention_gain", _finite(float(result["gain"]))))
        return metrics, curves


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
