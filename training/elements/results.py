"""The five-element metrics' registrations (one catalogue) and the result containers every reader shares.

Every metric the five-element evaluation (:mod:`pellucid.training.elements.evaluator` and the family tools it
feeds, :mod:`pellucid.training.elements.families`) or the report card's sanity check produces is registered
here, at import, in :mod:`pellucid.training.elements.registry`; task metrics are registered beside the code computing
them (:mod:`pellucid.training.metrics`). One catalogue, not one registration per computing module, because several
modules compute metrics of one element and the definitions must read as one consistent set (the same wording for
"mean over samples with a lesion", the same k); the registry still refuses a second registration of any name.

A :class:`MetricResult` carries the registered :class:`~pellucid.training.elements.registry.MetricDefinition` and the
value, never a free-text definition: the report card, the W&B logger and bundle metadata read both from it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from pellucid.training.elements.registry import (
    ELEMENT_TITLES,
    ELEMENTS,
    MetricDefinition,
    get_metric,
    list_metrics,
    register_metric,
)

__all__ = ["DEFAULT_DELETION_FRACTIONS", "ELEMENTS", "ELEMENT_TITLES", "EVALUATED_METRICS", "METRICS", "SANITY_METRICS",
           "Curve", "FiveElementResults", "MetricInfo", "MetricResult", "publish_results", "published_results"]

DEFAULT_DELETION_FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
_WITH_LESION = "mean over samples with a lesion"
_MARKER = "dilated by 2 pixels"

# ---------------------------------------------------------------------------------------------- localization
register_metric("pointing_game", "localization", "Share of samples with a lesion whose evidence-map peak (map of the "
                "predicted class) lies inside the lesion mask (constant maps left out).", None, True)
register_metric("constant_evidence_share", "localization", "Share of samples with a lesion whose evidence map is "
                "constant (it points at nothing; left out of the pointing game).", None, False)
register_metric("energy_inside_mask", "localization", f"Share of the evidence map's mass inside the lesion mask, "
                f"{_WITH_LESION}.", None, True)
register_metric("mask_dice", "localization", "Dice overlap of the evidence map thresholded at 0.5 with the lesion "
                f"mask, {_WITH_LESION}.", None, True)
register_metric("mask_iou", "localization", "Intersection over union of the evidence map thresholded at 0.5 with "
                f"the lesion mask, {_WITH_LESION}.", None, True)
register_metric("activation_precision", "localization", "Share of the evidence map's top-5% activations inside the "
                f"lesion mask, {_WITH_LESION}.", None, True)
_SIZE_BIN = ("whose lesion diameter (the data's diameter_mm concept; the index lesion on the phantom) lies in "
             "{diameter_bin} (lower end included, upper end excluded except in the last bin)")
register_metric("pointing_game_by_diameter/{diameter_bin}", "localization", "Pointing game (map of the predicted "
                f"class, constant maps left out) over the samples {_SIZE_BIN}.", None, True)
register_metric("energy_inside_mask_by_diameter/{diameter_bin}", "localization", "Share of the evidence map's mass "
                f"inside the lesion mask, mean over the samples {_SIZE_BIN}.", None, True)
_POSTHOC = ("of the predicted class, on the report's post-hoc comparison images (the first evaluated images with a "
            "lesion); built_in is the model's own localization, grad_cam, occlusion (MONAI) and integrated_gradients "
            "(captum) are post-hoc maps of the same model on the same images")
register_metric("posthoc_pointing_game/{explainer}", "localization", "Share of images whose {explainer} map peaks "
                f"inside the lesion mask (a constant map counts as a miss): the map {_POSTHOC}.", None, True)
register_metric("posthoc_energy_inside_mask/{explainer}", "localization", "Share of the {explainer} map's mass "
                f"inside the lesion mask: the map {_POSTHOC}.", None, True)

# ----------------------------------------------------------------------------------- visual recognizability
register_metric("prototype_purity", "visual_recognizability", "PIP-Net purity (Nauta et al. 2023): share of each "
                "prototype's k nearest images whose peak patch shows the prototype's most common structure (lesion "
                "type, or background), mean over prototypes.", None, True)
register_metric("prototype_lesion_type_purity", "visual_recognizability", "Mean over prototypes of the share of its "
                "k most similar samples (by prototype_similarity, whole images) that have the most common lesion type "
                "among them.", None, True)
register_metric("prototype_class_purity", "visual_recognizability", "Mean over prototypes of the share of its k most "
                "similar samples that have the most common class among them.", None, True)
register_metric("prototype_knn_class_purity", "visual_recognizability", "Share of each prototype's k nearest images "
                "that belong to the prototype's own class, mean over prototypes.", None, True)
register_metric("prototype_map_energy_inside_mask", "visual_recognizability", "Share of the most active prototype's "
                "map mass (at input resolution) inside the lesion mask.", None, True)
register_metric("prototype_activation_precision", "visual_recognizability", "Share of the top-5% activation of the "
                "most activated own-class prototype inside the lesion mask.", None, True)
register_metric("prototype_consistency", "visual_recognizability", "Share of prototypes whose peak lands on the same "
                "structure in >= 80% of their class's images.", None, True)
register_metric("prototype_stability", "visual_recognizability", "Share of own-class images whose prototype peak "
                "structure survives small input noise, mean over prototypes.", None, True)
register_metric("duplicate_prototype_sources", "visual_recognizability", "Number of prototypes whose source patch "
                "(training image and latent cell, from the provenance) another prototype already shows; pruned "
                "prototypes left out. 0: every prototype shows its own patch.", None, False)
register_metric("prototype_structures_shown", "visual_recognizability", "Number of distinct structures (lesion "
                "types; background counts as one) that the prototypes' k nearest images show most often: a high "
                "purity with few structures means the prototypes collapsed onto a few easy ones.", None, True)

# ------------------------------------------------------------------------------------- physical attribution
register_metric("concept_accuracy", "physical_attribution", "Share of annotated (sample, binary concept) pairs where "
                "the predicted probability >= 0.5 agrees with the annotation.", None, True)
register_metric("concept_auroc", "physical_attribution", "Mean over binary concepts (both values present) of the "
                "AUROC of the predicted concept probability.", None, True)
register_metric("concept_map_energy_inside_mask", "physical_attribution", "Share of each concept map's mass (at input "
                "resolution) inside the lesion mask, mean over concepts and samples with a lesion.", None, True)
register_metric("concept_map_pointing_game", "physical_attribution", "Share of (scan with a lesion, binary finding "
                "annotated present) pairs whose concept map peaks on the lesion mask (upsampled to the input; a "
                "constant map misses): is the finding read where it is.", None, True)
register_metric("concept/{concept}/map_pointing_game", "physical_attribution", "Share of scans with a lesion showing "
                "{concept} (binary: annotated present) whose {concept} map peaks on the lesion mask.", None, True)
register_metric("concept_mae/{concept}", "physical_attribution", "Mean absolute error of the predicted {concept}, in "
                "its unit, over annotated samples.", "{unit}", False)
register_metric("concept/{concept}/accuracy", "physical_attribution", "Share of annotated samples where binary "
                "concept {concept} is predicted present (logit > 0) exactly when it is annotated present.", None, True)
register_metric("concept/{concept}/auroc", "physical_attribution", "AUROC of binary concept {concept}'s predicted "
                "probability over annotated samples (not measured when only one value is annotated).", None, True)

# --------------------------------------------------------------------------------------------- transparency
register_metric("logit_reconstruction_error", "transparency", "Mean over samples of the largest absolute difference "
                "between the logits and the logits recomputed from the explanation by the model's linear head.",
                None, False)
register_metric("logit_reconstruction_exact", "transparency", "Share of samples whose logits the linear head over the "
                "explanation reproduces to float32 precision.", None, True)
register_metric("contribution_reconstruction_error", "transparency", "Largest over samples of the relative error of "
                "the logits rebuilt as the sum of the model's per-location contributions (B-cos: W(x)·x): "
                "max over classes |sum of contributions - logit| / max over classes |logit|.", None, False)
register_metric("head_sparsity", "transparency", "Share of the linear head's weights with magnitude <= 1e-3 of the "
                "largest one.", None, True)
register_metric("head_terms_per_class", "transparency", "Mean number of non-negligible head weights per class (terms "
                "a reader must read to follow one decision).", None, False)
register_metric("head_terms_per_decision", "transparency", "Mean over samples of the number of explanation entries "
                "(prototypes, concepts, features) whose contribution weight x value to the predicted class's logit is "
                "above 1e-3 of the sample's largest: for a prototype head, prototypes per decision.", None, False)
register_metric("deletion_auc", "transparency", "Mean predicted-class probability while the most-evidenced pixels are "
                "replaced by the image mean (area under the deletion curve, fractions 0 to 1; pixels of equal evidence "
                "are deleted as one block, so the order of ties does not matter).", None, False)
register_metric("reverse_deletion_auc", "transparency", "The same area when the least-evidenced pixels are deleted "
                "first (the reference).", None, None)
register_metric("deletion_faithfulness", "transparency", "reverse_deletion_auc - deletion_auc (most- vs least-"
                "relevant first, Samek et al. 2017): how much faster the prediction falls when the evidenced pixels "
                "go first (> 0: faithful).", None, True)
register_metric("insertion_auc", "transparency", "Mean predicted-class probability while the most-evidenced pixels are "
                "put back into the image-mean baseline (area under the insertion curve, Petsiuk et al. 2018; ties as "
                "one block).", None, True)
register_metric("deletion_tied_share", "transparency", "Share of the evidence map's pixels in groups of equal value "
                "that hold at least 1% of the map (e.g. its minimum), mean over the samples with deletion curves; each "
                "group is deleted as one block.", None, None)
register_metric("randomization_spearman", "transparency", "Spearman rank correlation of the explanation before and "
                "after randomising every layer (cascading, top first; Adebayo et al. 2018); low means the explanation "
                "depends on what the model learned.", None, False)
register_metric("randomization_ssim", "transparency", "Windowed structural similarity (SSIM, Gaussian window of "
                "sigma 1.5; torchmetrics) of the explanation before and after the whole randomisation cascade, mean "
                "over the checked images.", None, False)
register_metric("randomization_flagged", "transparency", "1 when the explanation did not change (Spearman >= 0.8) "
                "after every layer was randomised: it does not reflect the model.", None, False)

# -------------------------------------------------------------------------------------------- actionability
register_metric("intervention_gain", "actionability", "Accuracy with every annotated concept set to its true value "
                "minus accuracy without interventions.", None, True)
register_metric("intervention_auc_{policy}", "actionability", "Area under the accuracy curve as concepts are set to "
                "their true value ({policy} order first), steps scaled to [0, 1].", None, True)
register_metric("shortcut_share", "actionability", f"Share of the evidence map's mass on the known shortcut marker "
                f"({_MARKER}), mean over samples that carry the marker.", None, False)
register_metric("shortcut_pointing", "actionability", "Share of samples carrying the marker whose evidence peak lies "
                f"on it ({_MARKER}; constant maps left out).", None, False)
register_metric("shortcut_enrichment", "actionability", f"Mean evidence on the marker ({_MARKER}) over the image's "
                "mean evidence, mean over samples that carry the marker (1 = what a uniform map gives).", None, False)
register_metric("shortcut_flagged", "actionability", "1 when shortcut_enrichment >= 3 or shortcut_pointing >= 0.5: the "
                "evidence concentrates on the shortcut marker.", None, False)
register_metric("abstention_share", "actionability", "Share of samples on which the model abstained (declined to "
                "decide, e.g. PIP-Net when no prototype it weighs is present): a cue to defer to a person.", None, None)

# ------------------------------------------------- counterfactual (phantom twins; docs/counterfactual_metrics.md)
_TWINS = "over phantom scans and their counterfactual twins"
register_metric("counterfactual_correctness", "transparency", "FunnyBirds-style single-deletion check: for every pair "
                "of a scan's removable parts (lesion, spicules, calcifications, lobes, size, marker) whose removal "
                "changes the predicted-class probability by amounts at least 0.05 apart, 1 if the explanation's mass "
                "on the parts (beyond a uniform map's) is ordered like those changes, 0.5 if equal, else 0; mean "
                f"{_TWINS}.", None, True)
register_metric("counterfactual_completeness", "transparency", "Removing only the explanation's top n pixels (n = "
                "pixels that differ from the twin without any finding; they take the twin's values) lowers the "
                "predicted-class probability by this share of what removing every finding does (clipped to [0, 1]), "
                f"mean {_TWINS} where that removal lowers it by >= 0.1.", None, True)
register_metric("counterfactual_label_agreement", "transparency", "Share of twins (a finding removed or changed) "
                "whose predicted class is the twin's true label under the phantom's label rule.", None, True)
register_metric("counterfactual_effect/{change}", "transparency", "Mean drop of the predicted-class probability when "
                "the scan is rendered with change {change}, over the scans it applies to.", None, None)
register_metric("counterfactual_concept_direction", "physical_attribution", "Share of twins that remove a binary "
                "finding or move the diameter across 10 mm whose predicted concept moves the way the true concept "
                f"does, {_TWINS}.", None, True)
register_metric("counterfactual_concept_direction/{concept}", "physical_attribution", "Share of twins that change "
                "{concept} whose predicted {concept} moves the way the true one does.", None, True)
register_metric("counterfactual_concept_leakage", "physical_attribution", "Mean absolute change of the predicted "
                "probabilities of the binary concepts a twin did not change (0: concepts follow only their own "
                "finding).", None, False)

_CATALOGUE = [metric for metric in list_metrics() if metric.module == __name__]
SANITY_METRICS = ("randomization_spearman", "randomization_ssim", "randomization_flagged")
# every five-element evaluation reports these rows (None where not measurable), in registration order; members of
# families (per concept, per intervention policy) are added where measured
EVALUATED_METRICS = tuple(m.name for m in _CATALOGUE if not m.is_family and m.name not in SANITY_METRICS)
# The evaluated single metrics by name (read-only view of the registry, for code that iterated the old table).
METRICS: dict[str, MetricDefinition] = {name: get_metric(name) for name in EVALUATED_METRICS}
MetricInfo = MetricDefinition  # the old name of a metric's description, still exported by five_elements


@dataclass(frozen=True)
class MetricResult:
    """One measured metric: the registered metric it is, and its value (``None`` when not measurable)."""

    metric: MetricDefinition
    value: float | None

    @classmethod
    def of(cls, name: str, value: float | None, **parameters: str) -> MetricResult:
        """The result of registered metric ``name`` (a family member by its concrete name; ``unit=`` if templated).

        Raises:
            KeyError: naming the metric when it is not registered.
        """
        return cls(get_metric(name, **parameters), value)

    @property
    def name(self) -> str:
        """The metric's registered (concrete) name."""
        return self.metric.name

    @property
    def element(self) -> str:
        """The element it measures."""
        return self.metric.element

    @property
    def definition(self) -> str:
        """The registered definition."""
        return self.metric.definition

    @property
    def unit(self) -> str | None:
        """The registered unit."""
        return self.metric.unit

    @property
    def higher_is_better(self) -> bool | None:
        """The registered direction."""
        return self.metric.higher_is_better

    def to_dict(self) -> dict[str, Any]:
        """Plain form: name, element, value, definition, unit, direction."""
        return {"name": self.name, "element": self.element, "value": self.value, "definition": self.definition,
                "unit": self.unit, "higher_is_better": self.higher_is_better}


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
    """Everything one evaluation measured, with the reasons for what it could not measure.

    Raises:
        ValueError: at construction when two rows carry one name (one value per registered metric).
    """

    metrics: list[MetricResult] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    samples: int = 0

    def __post_init__(self) -> None:
        repeated = sorted(name for name, count in Counter(m.name for m in self.metrics).items() if count > 1)
        if repeated:
            raise ValueError(f"FiveElementResults: metrics {repeated} appear more than once; each registered metric "
                             "has one value per evaluation")

    def value(self, name: str) -> float | None:
        """Value of metric ``name`` (``None`` if not measured).

        Raises:
            KeyError: naming the metric and the known ones.
        """
        return self.result(name).value

    def result(self, name: str) -> MetricResult:
        """The row of metric ``name``.

        Raises:
            KeyError: naming the metric and the known ones.
        """
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise KeyError(f"no metric {name!r}; known: {[m.name for m in self.metrics]}")

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}<element>/<name>`` -> value, for every measured metric (for loggers)."""
        return {f"{prefix}{m.element}/{m.name}": m.value for m in self.metrics if m.value is not None}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (each metric with its registered definition)."""
        return {"metrics": [m.to_dict() for m in self.metrics], "curves": [asdict(c) for c in self.curves],
                "notes": self.notes, "samples": self.samples}


# ------------------------------------------------------------------------------------------------ publishing
RESULTS_ATTRIBUTE = "five_element_results"


def publish_results(pl_module: Any, stage: str, results: FiveElementResults) -> None:
    """Publish ``results`` of ``stage`` on the module (public ``five_element_results``: stage -> results).

    The five-element callback publishes here; other callbacks (the W&B logger) read :func:`published_results`
    instead of reaching into the callback that computed them.
    """
    published = getattr(pl_module, RESULTS_ATTRIBUTE, None)
    if not isinstance(published, dict):
        published = {}
        setattr(pl_module, RESULTS_ATTRIBUTE, published)
    published[stage] = results


def published_results(pl_module: Any, stage: str) -> FiveElementResults | None:
    """The latest results published for ``stage`` on the module, or ``None``."""
    published = getattr(pl_module, RESULTS_ATTRIBUTE, None)
    return published.get(stage) if isinstance(published, dict) else None
