"""The evaluator behind the five-element metrics: torchmetrics states fed ``(model, output, batch)``.

Per-batch measurements come from the element modules (:mod:`.localization`, :mod:`.transparency`,
:mod:`.actionability`, :mod:`.physical_attribution`); the metric definitions from
:mod:`pellucid.training.elements.results`. Every state is a torchmetrics ``Metric`` state, so results
synchronise across DDP processes.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric, Metric
from torchmetrics.utilities import dim_zero_cat

from pellucid.models import ConceptSpec, InterpretableModel, ModelOutput
from pellucid.models.concept_layers import unit_values
from pellucid.models.concepts import as_concept_spec
from pellucid.training.elements import actionability, faithfulness, localization, physical_attribution, transparency
from pellucid.training.elements.concept_maps import ConceptMapPointing
from pellucid.training.elements.counterfactual import CounterfactualMetrics, TwinSource
from pellucid.training.elements.families import FamilyMetrics
from pellucid.training.elements.localization import (
    DIAMETER_CONCEPT,
    ActivationPrecision,
    EnergyInsideMask,
    LocalizationBySize,
    MaskDice,
    PointingGame,
    SampleMean,
    dilate,
)
from pellucid.training.elements.results import (
    DEFAULT_DELETION_FRACTIONS,
    ELEMENTS,
    EVALUATED_METRICS,
    Curve,
    FiveElementResults,
    MetricResult,
)


class _Rows(Metric):
    """Keeps every sample's row of named tensors (concatenated across batches and processes)."""

    full_state_update = False

    def __init__(self, names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names = list(names)
        for name in self.names:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, **rows: Tensor) -> None:
        """Append one batch of rows per name."""
        for name in self.names:
            getattr(self, name).append(rows[name].float())

    def compute(self) -> dict[str, Tensor]:
        """Every row so far, per name (empty tensors before any)."""
        rows = {}
        for name in self.names:
            state = getattr(self, name)  # a list while local, one tensor once synchronised across processes
            rows[name] = dim_zero_cat(state) if isinstance(state, Tensor) or state else torch.empty(0)
        return rows


def _number(value: Tensor | float | None) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


class ExplanationEvaluator(nn.Module):
    """Accumulate the five-element metrics over batches of ``(model, output, batch)``.

    Args:
        task: ``"multiclass"``, ``"multilabel"`` or ``"segmentation"`` (probabilities for deletion curves).
        concept_specs: The concepts the model predicts, in ``concept_logits`` column order.
        data_concept_specs: The concepts ``batch["concepts"]`` holds; columns are matched by name (same order and
            count assumed when only one of the two lists is known).
        deletion_fractions: Fractions of pixels deleted along the deletion curves (increasing).
        deletion_samples: Samples per process and evaluation that get deletion, reverse-deletion and insertion curves
            (each costs ``3 * len(deletion_fractions)`` forward passes, more where a fraction cuts a tie block).
        deletion_baseline: Value of deleted pixels: ``"mean"`` (image mean) or ``"zero"``.
        prototype_top_k: ``k`` of prototype purity.
        shortcut_enrichment_threshold: ``shortcut_enrichment`` from which the shortcut is flagged: the evidence on
            the marker is this many times denser than a uniform map would put there.
        shortcut_tolerance: The marker is dilated by this many pixels/voxels before measuring (coarse maps, e.g.
            Grad-CAM at stride 8, cannot hit a marker a few pixels wide exactly).
        seed: Seed of the random intervention order (deletion curves delete tied pixels as one block: no seed).
        twins: The data's counterfactual twins (:func:`~pellucid.training.elements.counterfactual.twin_source`);
            ``None``: the counterfactual metrics are not applicable.
        counterfactual_samples: Samples per process and evaluation that get counterfactual twins.
    """

    def __init__(
        self,
        task: str = "multiclass",
        concept_specs: Sequence[ConceptSpec | dict[str, Any]] | None = None,
        data_concept_specs: Sequence[ConceptSpec | dict[str, Any]] | None = None,
        deletion_fractions: Sequence[float] = DEFAULT_DELETION_FRACTIONS,
        deletion_samples: int = 64,
        deletion_baseline: transparency.DeletionBaseline = "mean",
        prototype_top_k: int = 5,
        shortcut_enrichment_threshold: float = 3.0,
        shortcut_tolerance: int = 2,
        seed: int = 0,
        twins: TwinSource | None = None,
        counterfactual_samples: int = 512,
    ) -> None:
        super().__init__()
        fractions = [float(f) for f in deletion_fractions]
        if len(fractions) < 2 or any(b <= a for a, b in zip(fractions, fractions[1:], strict=False)) or \
                not 0.0 <= fractions[0] or fractions[-1] > 1.0:
            raise ValueError(f"deletion_fractions must increase within [0, 1] (two or more), got {list(fractions)}")
        if deletion_samples < 0 or prototype_top_k < 1:
            raise ValueError(f"deletion_samples must be >= 0 and prototype_top_k >= 1, got {deletion_samples} "
                             f"and {prototype_top_k}")
        self.task, self.fractions, self.deletion_samples = task, fractions, deletion_samples
        self.deletion_baseline, self.prototype_top_k = deletion_baseline, prototype_top_k
        self.shortcut_enrichment_threshold = shortcut_enrichment_threshold
        self.shortcut_tolerance, self.seed = shortcut_tolerance, seed
        model_specs = [as_concept_spec(c) for c in concept_specs or []]
        data_specs = [as_concept_spec(c) for c in data_concept_specs or []]
        self.concept_specs = model_specs or data_specs
        self.concept_pairs = self._pair_concepts(model_specs, data_specs)
        self.localization_metrics = nn.ModuleDict({
            "pointing_game": PointingGame(), "energy_inside_mask": EnergyInsideMask(), "mask_dice": MaskDice(0.5),
            "mask_iou": MaskDice(0.5, iou=True), "activation_precision": ActivationPrecision(95.0)})
        # localization per lesion-diameter bin, where the data annotates the diameter (the phantom's column 0)
        names = [spec.name for spec in data_specs or model_specs]
        self.diameter_column = names.index(DIAMETER_CONCEPT) if DIAMETER_CONCEPT in names else None
        self.localization_by_size = LocalizationBySize()
        self.constant_evidence = SampleMean()
        self.prototype_rows = _Rows(["similarity", "lesion_type", "label"])
        self.prototype_map_energy = EnergyInsideMask()
        self.concept_rows = _Rows(["predicted", "true"])
        self.concept_map_energy = EnergyInsideMask()
        self.concept_map_pointing = ConceptMapPointing(self.concept_specs)
        self.reconstruction_error, self.reconstruction_exact = SampleMean(), SampleMean()
        self.decision_terms, self.abstained = SampleMean(), SampleMean()
        self.contribution_error = MaxMetric()
        self.deletion, self.reverse_deletion = SampleMean(len(fractions)), SampleMean(len(fractions))
        self.insertion, self.tied_share = SampleMean(len(fractions)), SampleMean()
        self.shortcut_share, self.shortcut_pointing = EnergyInsideMask(), PointingGame()
        self.shortcut_enrichment = SampleMean()
        self.family = FamilyMetrics(self.concept_specs, seed=seed)
        self.counterfactual = CounterfactualMetrics(twins, self.concept_specs, task, counterfactual_samples)
        self._head: transparency.LinearExplanationHead | None = None
        self._notes: dict[str, set[str]] = defaultdict(set)
        self._deletion_seen, self._samples = 0, 0

    @staticmethod
    def _pair_concepts(model_specs: list[ConceptSpec], data_specs: list[ConceptSpec]) -> list[tuple[int, int]]:
        """(model column, data column) pairs: by name when both lists are known, else by position."""
        if model_specs and data_specs:
            data_index = {spec.name: index for index, spec in enumerate(data_specs)}
            return [(i, data_index[s.name]) for i, s in enumerate(model_specs) if s.name in data_index]
        return [(i, i) for i in range(len(model_specs or data_specs))]

    def reset(self) -> None:
        """Forget every sample (call between evaluations)."""
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()
        self.family.reset()
        self.counterfactual.reset()
        self._notes.clear()
        self._head, self._deletion_seen, self._samples = None, 0, 0

    # ------------------------------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, model: nn.Module, output: ModelOutput, batch: Mapping[str, Any]) -> None:
        """Measure one batch: ``output`` is what ``model`` returned (explained) for ``batch["image"]``."""
        image = batch["image"]
        self._samples += image.shape[0]
        maps = localization.evidence_maps(output)
        lesion = batch.get("mask")
        if lesion is not None:
            lesion = (lesion > 0).float()  # segmentation masks hold class indices; any foreground is the finding
        self._update_localization(maps, lesion)
        if maps is not None and lesion is not None and self.diameter_column is not None and "concepts" in batch:
            self.localization_by_size.update(maps, lesion, batch["concepts"][:, self.diameter_column].float())
        self._update_prototypes(output, batch, lesion)
        specs_fit = output.concept_logits is not None and output.concept_logits.shape[1] == len(self.concept_specs)
        true = self._true_concepts(batch["concepts"], len(self.concept_specs)) \
            if "concepts" in batch and self.concept_pairs and specs_fit else None
        self._update_concepts(output, batch, lesion, true)
        self._update_transparency(model, output, image, maps)
        self._update_actionability(model, output, batch, maps)
        self.family.update(model, output, batch, true, intervene=output.logits is not None)
        self.counterfactual.update(model, output, batch, maps)

    def _update_localization(self, maps: Tensor | None, lesion: Tensor | None) -> None:
        if maps is None or lesion is None:
            self._notes["localization"].add("the model returns no localization" if maps is None
                                            else "the batch carries no ground-truth mask")
            return
        informative = localization.informative_maps(maps)
        self.constant_evidence.update((~informative)[lesion.flatten(1).amax(dim=1) > 0].float())
        for name, metric in self.localization_metrics.items():
            if name == "pointing_game":  # a constant map has its "peak" everywhere: it points at nothing
                metric.update(maps[informative], lesion[informative])
            else:
                metric.update(maps, lesion)

    def _update_prototypes(self, output: ModelOutput, batch: Mapping[str, Any], lesion: Tensor | None) -> None:
        similarity = output.prototype_similarity
        if similarity is None:
            self._notes["visual_recognizability"].add("the model has no prototypes (prototype_similarity is None)")
            return
        missing = torch.full((similarity.shape[0],), -1.0, device=similarity.device)
        lesion_type, label = batch.get("lesion_type"), batch.get("label")
        if lesion_type is None:
            self._notes["visual_recognizability"].add("the batch carries no lesion_type (prototype purity)")
        self.prototype_rows.update(
            similarity=similarity,
            lesion_type=lesion_type if lesion_type is not None else missing,
            label=label if label is not None and label.ndim == 1 else missing)
        if output.prototype_maps is not None and lesion is not None:
            top = similarity.argmax(dim=1)
            top_maps = output.prototype_maps[torch.arange(similarity.shape[0]), top].unsqueeze(1)
            self.prototype_map_energy.update(localization.upsample_to(top_maps, lesion.shape[2:]), lesion)

    def _update_concepts(self, output: ModelOutput, batch: Mapping[str, Any], lesion: Tensor | None,
                         true: Tensor | None) -> None:
        logits = output.concept_logits
        if logits is None:
            self._notes["physical_attribution"].add("the model predicts no concepts (concept_logits is None)")
            return
        if true is None:  # no annotations, or concepts that do not match concept_logits
            self._notes["physical_attribution"].add(
                "the batch carries no concept annotations" if "concepts" not in batch
                else "the model's concept specifications are unknown or do not match concept_logits")
            return
        self.concept_rows.update(predicted=unit_values(logits, self.concept_specs), true=true)
        if output.concept_maps is not None and lesion is not None:
            count = output.concept_maps.shape[1]
            maps = localization.upsample_to(output.concept_maps, lesion.shape[2:]).flatten(0, 1).unsqueeze(1)
            self.concept_map_energy.update(maps, lesion.repeat_interleave(count, dim=0))
            self.concept_map_pointing.update(output.concept_maps, lesion, true)

    def _true_concepts(self, concepts: Tensor, width: int) -> Tensor:
        """Annotations in the model's concept order (NaN where the data has no such column)."""
        true = torch.full((concepts.shape[0], width), math.nan, device=concepts.device)
        for model_column, data_column in self.concept_pairs:
            if data_column < concepts.shape[1]:
                true[:, model_column] = concepts[:, data_column].float()
        return true

    def _update_transparency(self, model: nn.Module, output: ModelOutput, image: Tensor, maps: Tensor | None) -> None:
        if output.logits is None:
            self._notes["transparency"].add("the model makes no logits (reconstruction and deletion need them)")
            return
        head = transparency.explanation_head(model)
        if head is None:
            self._notes["transparency"].add("the model exposes no linear head over its explanation "
                                            "(InterpretableModel.explanation_head returns None)")
        else:
            error, exact = transparency.logit_reconstruction(head, image, output)
            self.reconstruction_error.update(error)
            self.reconstruction_exact.update(exact)
            self.decision_terms.update(transparency.decision_terms(head, image, output))
            self._head = head
        contributions = transparency.logit_contributions(model, output)
        if contributions is not None:
            self.contribution_error.update(transparency.contribution_reconstruction_error(contributions, output.logits))
        take = min(image.shape[0], self.deletion_samples - self._deletion_seen)
        if maps is None or take <= 0:
            return
        classes = localization.predicted_classes(output)[:take]
        self.tied_share.update(faithfulness.tied_share(maps[:take]))
        for least_first, insert, metric in ((False, False, self.deletion), (True, False, self.reverse_deletion),
                                            (False, True, self.insertion)):
            order = faithfulness.deletion_order(maps[:take], least_first=least_first)
            metric.update(faithfulness.perturbation_curve(model, image[:take], order, classes, self.fractions,
                                                          self.task, self.deletion_baseline, maps[:take], insert))
        self._deletion_seen += take

    def _update_actionability(self, model: nn.Module, output: ModelOutput, batch: Mapping[str, Any],
                              maps: Tensor | None) -> None:
        abstained = model.abstentions(output) if isinstance(model, InterpretableModel) else None
        if abstained is not None:
            self.abstained.update(abstained.float())
        # the intervention curves and intervention_gain are measured once, by the concept tools (FamilyMetrics)
        if not (actionability.accepts_interventions(model) and output.logits is not None and "concepts" in batch
                and "label" in batch and self.concept_specs):
            self._notes["actionability"].add("no concept interventions: the model does not accept them "
                                             "(accepts_interventions() is False), or the batch has no concepts and "
                                             "labels")
        if maps is not None and "confounder_mask" in batch:
            marker = dilate(batch["confounder_mask"].float(), self.shortcut_tolerance)
            self.shortcut_share.update(maps, marker)
            self.shortcut_enrichment.update(actionability.marker_enrichment(maps, marker))
            informative = localization.informative_maps(maps)
            self.shortcut_pointing.update(maps[informative], marker[informative])
        else:
            self._notes["actionability"].add("no shortcut check: the batch carries no confounder_mask"
                                             if maps is not None else "no shortcut check: no localization")

    # ----------------------------------------------------------------------------------------- compute
    def compute(self) -> FiveElementResults:
        """Every metric over the samples seen (synchronised across processes); ``None`` where not measurable.

        Every process must call this (the synchronisation is collective).
        """
        with warnings.catch_warnings():
            # metrics of elements this model or data cannot measure were never updated; they compute to "none"
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
            return self._compute()

    def _compute(self) -> FiveElementResults:
        values: dict[str, float | None] = {}
        for name, metric in self.localization_metrics.items():
            values[name] = _number(metric.compute())
        values["constant_evidence_share"] = _number(self.constant_evidence.compute())
        values.update(self._prototype_values())
        concept_values, concept_units = self._concept_values()
        values.update(concept_values)
        values["concept_map_energy_inside_mask"] = _number(self.concept_map_energy.compute())
        values["prototype_map_energy_inside_mask"] = _number(self.prototype_map_energy.compute())
        values["logit_reconstruction_error"] = _number(self.reconstruction_error.compute())
        values["logit_reconstruction_exact"] = _number(self.reconstruction_exact.compute())
        values["contribution_reconstruction_error"] = _number(self.contribution_error.compute()) \
            if self.contribution_error.update_called else None
        sparsity = transparency.head_sparsity(self._head.weight) if self._head is not None else (None, None)
        values["head_sparsity"], values["head_terms_per_class"] = sparsity
        values["head_terms_per_decision"] = _number(self.decision_terms.compute())
        values["abstention_share"] = _number(self.abstained.compute())
        deletion, reverse_deletion = self.deletion.compute(), self.reverse_deletion.compute()
        curves = []
        if not bool(torch.isnan(deletion).any()):
            area = float(transparency.curve_area(deletion.view(1, -1), self.fractions)[0])
            reverse_area = float(transparency.curve_area(reverse_deletion.view(1, -1), self.fractions)[0])
            insertion = self.insertion.compute()
            values.update(deletion_auc=area, reverse_deletion_auc=reverse_area,
                          deletion_faithfulness=reverse_area - area, deletion_tied_share=_number(
                              self.tied_share.compute()),
                          insertion_auc=float(transparency.curve_area(insertion.view(1, -1), self.fractions)[0]))
            for name, curve in (("deletion", deletion), ("reverse_deletion", reverse_deletion),
                                ("insertion", insertion)):
                curves.append(Curve(name, "transparency", list(self.fractions), curve.tolist(),
                                    f"fraction of pixels {'inserted' if name == 'insertion' else 'deleted'}",
                                    "predicted-class probability"))
        share, pointing = _number(self.shortcut_share.compute()), _number(self.shortcut_pointing.compute())
        enrichment = _number(self.shortcut_enrichment.compute())
        values.update(shortcut_share=share, shortcut_pointing=pointing, shortcut_enrichment=enrichment)
        values["shortcut_flagged"] = None if enrichment is None else float(
            enrichment >= self.shortcut_enrichment_threshold or (pointing is not None and pointing >= 0.5))
        family_metrics, family_curves = self.family.compute()
        counterfactual_metrics, counterfactual_notes = self.counterfactual.compute()
        for element, found in counterfactual_notes.items():
            self._notes[element] |= found
        family_metrics = family_metrics + counterfactual_metrics + self._size_bin_results()
        return self._results(values, concept_units, curves + family_curves, family_metrics)

    def _size_bin_results(self) -> list[MetricResult]:
        if self.diameter_column is None:
            return []
        by_size = self.localization_by_size.compute()
        return [MetricResult.of(f"{measure}_by_diameter/{bin_name}", value)
                for measure, values in by_size.items() for bin_name, value in values.items()]

    def _prototype_values(self) -> dict[str, float | None]:
        rows = self.prototype_rows.compute()
        similarity = rows["similarity"]
        purity: dict[str, float | None] = {"prototype_lesion_type_purity": None, "prototype_class_purity": None}
        if similarity.numel() == 0:
            return purity
        top = similarity.topk(min(self.prototype_top_k, similarity.shape[0]), dim=0).indices  # (k, P)
        for name, key in (("prototype_lesion_type_purity", "lesion_type"), ("prototype_class_purity", "label")):
            known = rows[key]
            if bool((known < 0).any()):
                continue
            neighbours = known[top]
            modal = neighbours.mode(dim=0).values
            purity[name] = float((neighbours == modal).float().mean())
        return purity

    def _concept_values(self) -> tuple[dict[str, float | None], dict[str, str | None]]:
        rows = self.concept_rows.compute()
        predicted, true = rows["predicted"], rows["true"]
        values: dict[str, float | None] = {}
        units = {f"concept_mae/{s.name}": s.unit for s in self.concept_specs if s.kind == "continuous"}
        hits, pairs, aurocs = 0.0, 0, []
        for column, spec in enumerate(self.concept_specs):
            known = ~torch.isnan(true[:, column]) if predicted.numel() else torch.zeros(0, dtype=torch.bool)
            if not bool(known.any()):
                continue
            scores, targets = predicted[known, column], true[known, column]
            if spec.kind == "continuous":
                values[f"concept_mae/{spec.name}"] = float((scores - targets).abs().mean())
                continue
            hits += float(((scores >= 0.5) == (targets >= 0.5)).float().sum())
            pairs += int(known.sum())
            auroc = physical_attribution.concept_auroc(scores, targets)
            aurocs += [] if auroc is None else [auroc]
        values["concept_accuracy"] = hits / pairs if pairs else None
        values["concept_auroc"] = sum(aurocs) / len(aurocs) if aurocs else None
        if self.concept_map_pointing.update_called:
            for name, share in self.concept_map_pointing.compute().items():
                key = "concept_map_pointing_game" if name == "lesion_findings" else f"concept/{name}/map_pointing_game"
                values[key] = None if math.isnan(share) else share
                if key != "concept_map_pointing_game":
                    units[key] = None
        return values, units

    def _results(self, values: dict[str, float | None], units: dict[str, str | None], curves: list[Curve],
                 family_metrics: list[MetricResult]) -> FiveElementResults:
        # every evaluated metric gets its row; a family tool's measured row replaces it, family members are added
        rows = {name: MetricResult.of(name, values.get(name)) for name in EVALUATED_METRICS}
        rows.update({name: MetricResult.of(name, values.get(name), unit=unit or "") for name, unit in units.items()})
        rows.update({row.name: row for row in family_metrics})
        metrics = list(rows.values())
        head_source = self._head.source if self._head is not None else None
        notes = {element: sorted(self._notes.get(element, ())) for element in ELEMENTS}
        if head_source is not None:
            notes["transparency"].append(f"linear head over: {head_source}")
        if self.contribution_error.update_called:
            notes["transparency"].append("logits rebuilt as the sum of the per-location contributions the model "
                                         "exposes (logit_contributions)")
        return FiveElementResults(metrics=metrics, curves=curves, notes=notes, samples=self._samples)
