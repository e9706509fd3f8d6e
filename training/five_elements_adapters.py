"""Adapters to the model families' own tools; the explanation code reaches the families only through this file.

Each adapter applies when the family module is importable and the model exposes what that module needs (by its
seams, never by its class); otherwise the generic measurements stand alone.

- Prototype networks (``pellucid.training.prototype_metrics``): patch purity (PIP-Net), k-NN class purity, prototype
  activation precision, consistency and stability, through that module's ``PrototypeEvaluation``; needs
  ``model.prototypes.prototype_classes`` and ``prototype_maps``.
- Concept models (``pellucid.training.concept_metrics``): per-concept accuracy, AUROC and error in the unit through
  ``ConceptMetrics``; (``pellucid.training.interventions``): intervention curves by policy (most uncertain concept
  first, random order) through ``intervention_logits`` and ``InterventionCurve``.
- Concept bottleneck heads: ``label_head.unit_weights(concept_bank)`` is the label head written over concept values
  in their units, a linear head over the explanation (exact logit reconstruction).
- Prototype provenance (push's record, ``model.prototypes.sources``) for the writer, and the prototype gallery
  (``pellucid.training.prototype_gallery``) for the report.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from pellucid.models import ConceptSpec, ModelOutput
from pellucid.training.five_elements_measures import LinearExplanationHead, accepts_interventions
from pellucid.training.five_elements_results import Curve, MetricResult

PROTOTYPE_DEFINITIONS = {
    "purity": "PIP-Net purity: share of each prototype's k nearest images whose peak patch shows the prototype's most "
              "common structure (lesion type or background), mean over prototypes.",
    "knn_class_purity": "Share of each prototype's k nearest images that belong to the prototype's class.",
    "activation_precision": "Share of the top-5% activation of the most activated own-class prototype inside the "
                            "lesion mask.",
    "consistency": "Share of prototypes whose peak lands on the same structure in >= 80% of their class's images.",
    "stability": "Share of own-class images whose prototype peak structure survives small input noise.",
    "structures_shown": "Number of distinct structures (lesion types; background counts as one) that the "
                        "prototypes' k nearest images show most often: a high purity with few structures means the "
                        "prototypes collapsed onto a few easy ones.",
}
INTERVENTION_POLICIES = ("uncertainty", "random")


def family_module(name: str) -> ModuleType | None:
    """``pellucid.<name>`` when that module exists in this checkout (import errors inside it propagate)."""
    full_name = f"pellucid.{name}"
    return importlib.import_module(full_name) if importlib.util.find_spec(full_name) is not None else None


def _prototype_classes(model: nn.Module) -> Tensor | None:
    classes = getattr(getattr(model, "prototypes", None), "prototype_classes", None)
    return classes if isinstance(classes, Tensor) else None


# ------------------------------------------------------------------------------------------------- heads
def family_linear_head(model: nn.Module, output: ModelOutput) -> LinearExplanationHead | None:
    """A concept bottleneck's label head over the concept values in their units (probabilities for binary ones)."""
    label_head, bank = getattr(model, "label_head", None), getattr(model, "concept_bank", None)
    specs: Sequence[ConceptSpec] | None = getattr(model, "concept_specs", None)
    if not callable(getattr(label_head, "unit_weights", None)) or bank is None or not specs \
            or output.concept_logits is None:
        return None
    weight, bias = label_head.unit_weights(bank)
    binary = torch.tensor([spec.kind == "binary" for spec in specs], device=output.concept_logits.device)

    def unit_values(_image: Tensor, out: ModelOutput) -> Tensor:
        return torch.where(binary, out.concept_logits.sigmoid(), out.concept_logits)

    return LinearExplanationHead("concept values in their units", weight, bias, unit_values,
                                 [spec.name for spec in specs])


def prototype_provenance(model: nn.Module) -> list[Any] | None:
    """One provenance entry (or ``None``) per prototype: ``model.prototype_provenance()``, else push's record."""
    method = getattr(model, "prototype_provenance", None)
    if callable(method):
        return list(method())
    sources = getattr(getattr(model, "prototypes", None), "sources", None)
    if not isinstance(sources, Sequence) or isinstance(sources, str):
        return None
    # push's record: one source per prototype (None until pushed), each with plain-value ``to_dict()``
    return [source.to_dict() if callable(getattr(source, "to_dict", None)) else source for source in sources]


def prototype_gallery(model: nn.Module, dataset: Callable[[], Any], class_names: Sequence[str] | None,
                      count: int = 6) -> Figure | None:
    """The source patches of the first ``count`` pushed prototypes (``None`` if none was pushed or no module).

    Args:
        model: The model.
        dataset: Returns the dataset push read (called only when a gallery can be drawn).
        class_names: Class names.
        count: Prototypes shown.
    """
    gallery = family_module("training.prototype_gallery")
    layer = getattr(model, "prototypes", None)
    if gallery is None or not hasattr(layer, "sources"):
        return None
    pushed = [index for index, source in enumerate(layer.sources) if source is not None][:count]
    if not pushed:
        return None
    entries = gallery.build_gallery(model, dataset(), None, class_names, prototypes=pushed)
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
        concept_metrics = family_module("training.concept_metrics")
        self.concepts = concept_metrics.ConceptMetrics(self.concept_specs) \
            if concept_metrics is not None and self.concept_specs else None
        self.interventions = family_module("training.interventions")
        self.curves = nn.ModuleDict()
        self.prototypes: Any = None
        self._prototype_module = family_module("training.prototype_metrics")
        self._batches = 0

    def reset(self) -> None:
        """Forget every batch."""
        if self.concepts is not None:
            self.concepts.reset()
        for curve in self.curves.values():
            curve.reset()
        self.prototypes = None  # a fresh PrototypeEvaluation starts with the next batch
        self._batches = 0

    @torch.no_grad()
    def update(self, model: nn.Module, output: ModelOutput, batch: Mapping[str, Any], true_concepts: Tensor | None,
               intervene: bool) -> None:
        """Feed one batch (``true_concepts`` in the model's concept order, NaN where unknown)."""
        if self._prototype_module is not None and output.prototype_maps is not None \
                and _prototype_classes(model) is not None:
            if self.prototypes is None:
                self.prototypes = self._prototype_module.PrototypeEvaluation()
            self.prototypes.update(SimpleNamespace(model=model), output, batch, self._batches)
        if self.concepts is not None and output.concept_logits is not None and true_concepts is not None \
                and output.concept_logits.shape[1] == len(self.concept_specs):
            self.concepts.to(output.concept_logits.device).update(output.concept_logits, true_concepts)
        label = batch.get("label")
        if intervene and self.interventions is not None and true_concepts is not None and label is not None \
                and label.ndim == 1 and accepts_interventions(model) and getattr(model, "concept_specs", None):
            generator = torch.Generator().manual_seed(self.seed + self._batches)
            for policy in INTERVENTION_POLICIES:
                if policy not in self.curves:
                    steps = self.interventions.num_steps(policy, model.concept_specs)
                    self.curves[policy] = self.interventions.InterventionCurve(steps)
                logits = self.interventions.intervention_logits(model, batch["image"], true_concepts, policy, 1,
                                                                generator)
                self.curves[policy].to(logits.device).update(logits, label)
        self._batches += 1

    def compute(self) -> tuple[list[MetricResult], list[Curve]]:
        """The families' metrics as extra :class:`MetricResult` rows and curves."""
        metrics: list[MetricResult] = []
        curves: list[Curve] = []
        if self.prototypes is not None:
            for name, value in self.prototypes.results().items():
                metrics.append(MetricResult(f"prototype_{name}", "visual_recognizability", _finite(value),
                                            PROTOTYPE_DEFINITIONS.get(name, name), True))
        if self.concepts is not None and self.concepts.update_called:
            for name, value in self.concepts.compute().items():
                if "/" not in name:
                    continue  # pooled numbers duplicate the generic concept_accuracy/concept_auroc
                concept, measure = name.split("/", 1)
                unit = next((s.unit for s in self.concept_specs if s.name == concept and s.kind == "continuous"), None)
                definition = (f"{measure.split('_')[0].upper()} of concept {concept} over annotated samples"
                              + (f", in {unit}" if unit else "") + ".")
                metrics.append(MetricResult(f"concept/{name}", "physical_attribution", _finite(float(value)),
                                            definition, not measure.startswith("mae"), unit))
        for policy, curve in self.curves.items():
            if not curve.update_called:
                continue
            result = curve.compute()
            accuracy = result["accuracy"].tolist()
            curves.append(Curve(f"intervention_{policy}", "actionability", list(range(len(accuracy))), accuracy,
                                "concepts set to their true value", "accuracy"))
            metrics.append(MetricResult(f"intervention_auc_{policy}", "actionability", _finite(float(result["auc"])),
                                        f"Area under the accuracy curve as concepts are corrected ({policy} order "
                                        "first), steps scaled to [0, 1].", True))
        return metrics, curves


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
