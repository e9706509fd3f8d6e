"""What the five-element metrics are: the elements, each metric's definition, and the result containers.

Shared by the evaluator (:mod:`pellucid.training.five_elements_evaluator`), the callback
(:mod:`pellucid.training.five_elements`), the W&B logger and the report card, so a metric is defined once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ELEMENTS = ("localization", "visual_recognizability", "physical_attribution", "transparency", "actionability")
ELEMENT_TITLES = {"localization": "Localization", "visual_recognizability": "Visual recognizability",
                  "physical_attribution": "Physical attribution", "transparency": "Model transparency",
                  "actionability": "Actionability"}
DEFAULT_DELETION_FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class MetricInfo:
    """What a metric means: its element, a one-sentence definition, and which direction is better."""

    element: str
    definition: str
    higher_is_better: bool | None


METRICS: dict[str, MetricInfo] = {
    "pointing_game": MetricInfo("localization", "Share of samples with a lesion whose evidence-map peak (map of the "
                                "predicted class) lies inside the lesion mask (constant maps left out).", True),
    "constant_evidence_share": MetricInfo("localization", "Share of samples with a lesion whose evidence map is "
                                          "constant (it points at nothing; left out of the pointing game).", False),
    "energy_inside_mask": MetricInfo("localization", "Share of the evidence map's mass inside the lesion mask, mean "
                                     "over samples with a lesion.", True),
    "mask_dice": MetricInfo("localization", "Dice overlap of the evidence map thresholded at 0.5 with the lesion "
                            "mask, mean over samples with a lesion.", True),
    "mask_iou": MetricInfo("localization", "Intersection over union of the evidence map thresholded at 0.5 with the "
                           "lesion mask, mean over samples with a lesion.", True),
    "activation_precision": MetricInfo("localization", "Share of the map's top-5% activations inside the lesion "
                                       "mask, mean over samples with a lesion.", True),
    "prototype_purity": MetricInfo("visual_recognizability", "Mean over prototypes of the share of its k most "
                                   "similar samples that have the most common lesion type among them.", True),
    "prototype_class_purity": MetricInfo("visual_recognizability", "Mean over prototypes of the share of its k most "
                                         "similar samples that have the most common class among them.", True),
    "prototype_map_energy_inside_mask": MetricInfo("visual_recognizability", "Share of the most active prototype's "
                                                   "map mass (at input resolution) inside the lesion mask.", True),
    "concept_accuracy": MetricInfo("physical_attribution", "Share of annotated (sample, binary concept) pairs where "
                                   "the predicted probability >= 0.5 agrees with the annotation.", True),
    "concept_auroc": MetricInfo("physical_attribution", "Mean over binary concepts (both values present) of the "
                                "AUROC of the predicted concept probability.", True),
    "concept_map_energy_inside_mask": MetricInfo("physical_attribution", "Share of each concept map's mass (at input "
                                                 "resolution) inside the lesion mask, mean over concepts and samples "
                                                 "with a lesion.", True),
    "logit_reconstruction_error": MetricInfo("transparency", "Mean over samples of the largest absolute difference "
                                             "between the logits and the logits recomputed from the explanation by "
                                             "the model's linear head.", False),
    "logit_reconstruction_exact": MetricInfo("transparency", "Share of samples whose logits the linear head over the "
                                             "explanation reproduces to float32 precision.", True),
    "head_sparsity": MetricInfo("transparency", "Share of the linear head's weights with magnitude <= 1e-3 of the "
                                "largest one.", True),
    "head_terms_per_class": MetricInfo("transparency", "Mean number of non-negligible head weights per class (terms "
                                       "a reader must read to follow one decision).", False),
    "deletion_auc": MetricInfo("transparency", "Mean predicted-class probability while the most-evidenced pixels are "
                               "replaced by the image mean (area under the deletion curve, fractions 0 to 1).", False),
    "reverse_deletion_auc": MetricInfo("transparency", "The same area when the least-evidenced pixels are deleted "
                                       "first (the reference).", None),
    "deletion_faithfulness": MetricInfo("transparency", "reverse_deletion_auc - deletion_auc (most- vs least-relevant "
                                        "first, Samek et al. 2017): how much faster the prediction falls when the "
                                        "evidenced pixels go first (> 0: faithful).", True),
    "intervention_gain": MetricInfo("actionability", "Accuracy with every annotated concept set to its true value "
                                    "minus accuracy without interventions.", True),
    "shortcut_share": MetricInfo("actionability", "Share of the evidence map's mass on the known shortcut marker "
                                 "(dilated by 2 pixels), mean over samples that carry the marker.", False),
    "shortcut_pointing": MetricInfo("actionability", "Share of samples carrying the marker whose evidence peak lies "
                                    "on it (dilated by 2 pixels; constant maps left out).", False),
    "shortcut_enrichment": MetricInfo("actionability", "Mean evidence on the marker (dilated by 2 pixels) over the "
                                      "image's mean evidence, mean over samples that carry the marker (1 = what a "
                                      "uniform map gives).", False),
    "shortcut_flagged": MetricInfo("actionability", "1 when shortcut_enrichment >= 3 or shortcut_pointing >= 0.5: the "
                                   "evidence concentrates on the shortcut marker.", False),
}


@dataclass
class MetricResult:
    """One measured metric: its name, element, value (``None`` when not measurable) and meaning."""

    name: str
    element: str
    value: float | None
    definition: str
    higher_is_better: bool | None
    unit: str | None = None


@dataclass
class Curve:
    """A measured curve (deletion, intervention): mean ``y`` at each ``x``."""

    name: str
    element: str
    x: list[float]
    y: list[float]
    xlabel: str
    ylabel: str


@dataclass
class FiveElementResults:
    """Everything one evaluation measured, with the reasons for what it could not measure."""

    metrics: list[MetricResult] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    samples: int = 0

    def value(self, name: str) -> float | None:
        """Value of metric ``name`` (``None`` if not measured).

        Raises:
            KeyError: naming the metric and the known ones.
        """
        for metric in self.metrics:
            if metric.name == name:
                return metric.value
        raise KeyError(f"no metric {name!r}; known: {[m.name for m in self.metrics]}")

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}<element>/<name>`` -> value, for every measured metric (for loggers)."""
        return {f"{prefix}{m.element}/{m.name}": m.value for m in self.metrics if m.value is not None}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)
