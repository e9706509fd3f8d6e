"""Counterfactual metrics: is an explanation right about what the model does when a finding is removed?

After FunnyBirds (Hesse, Schaub-Meyer and Roth, "FunnyBirds: A Synthetic Vision Dataset for a Part-Based Analysis of
Explainable AI Methods", ICCV 2023): the phantom renders every test scan again with one thing removed or changed
(:mod:`pellucid.training.data.phantom_twins`), bit-identical elsewhere, so the effect of each part on the model's
output is measured, not guessed, and the explanation can be checked against it. Definitions (``docs/
counterfactual_metrics.md``), with ``ŷ`` the class the model predicts for the scan ``x``, ``p(·)`` its probability,
``m`` the explanation (evidence map of ``ŷ``), and for each change ``c`` the twin ``x_c``, the voxels ``R_c`` where
``x_c`` differs from ``x`` and the effect ``Δ_c = p(x) - p(x_c)``:

- **counterfactual_correctness** (transparency; FunnyBirds' single-deletion check): over the parts of a scan (lesion,
  spicules, calcifications, lobes, size, marker: the changes that apply), the explanation's importance of a part is
  its mass on ``R_c`` beyond what a uniform map of the same total puts there, ``Σ_{R_c} m - |R_c| Σ m / V``; for
  every pair of parts whose effects differ by at least 0.05, 1 if the explanation orders them like their effects,
  1/2 if it gives them equal importance, 0 otherwise; the mean over all pairs of all scans (0.5: no better than
  chance; a constant or empty map scores 0.5).
- **counterfactual_completeness** (transparency; FunnyBirds' deletion check): for scans whose ``normal`` twin (every
  lesion and the marker removed) lowers ``p`` by at least 0.1, remove only what the explanation marks: its top
  ``n = |R_normal|`` voxels take the ``normal`` twin's values (ties at the cut as one block, interpolated like the
  deletion curves); ``min(1, max(0, Δ_E / Δ_normal))``, mean over those scans.
- **counterfactual_label_agreement** (transparency): share of applicable twins whose predicted class is the twin's
  true label (``LABEL_RULE`` of its changed findings): does the model follow the rule under interventions?
- **counterfactual_effect/{change}** (transparency): mean ``Δ_c`` over the scans the change applies to.
- **counterfactual_concept_direction** (physical attribution; for concept models): for each twin that removes a binary
  finding or moves the diameter across 10 mm, whether the predicted concept moves the way the true one does
  (probability falls / predicted mm rises or falls); share over (scan, change) pairs, and per concept.
- **counterfactual_concept_leakage** (physical attribution): mean absolute change of the predicted probabilities of
  the binary concepts the twin did not change (0: the concepts are disentangled).

They need twins, which only the phantom data makes (a data module with ``counterfactual_twins(ids, changes)``);
elsewhere they are not measured and the report says why.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from pellucid.models import ConceptSpec, ModelOutput
from pellucid.models.concept_layers import unit_values
from pellucid.training.data.phantom_rule import PHANTOM_CONCEPTS
from pellucid.training.data.phantom_twins import CHANGED_CONCEPT, TWIN_CHANGES, TwinBatch
from pellucid.training.elements.localization import SampleMean
from pellucid.training.elements.results import MetricResult
from pellucid.training.metrics import probabilities

__all__ = ["COMPLETENESS_MIN_EFFECT", "EFFECT_MARGIN", "NOT_APPLICABLE", "PART_CHANGES", "CounterfactualMetrics",
           "TwinSource", "completeness_scores", "correctness_pairs", "top_blocks", "twin_source"]

TwinSource = Callable[[Sequence[str], Sequence[str]], Mapping[str, TwinBatch]]
PART_CHANGES = ("no_lesion", "no_spiculation", "no_calcification", "no_irregularity", "cross_diameter", "no_marker")
REFERENCE_CHANGE = "normal"
EFFECT_MARGIN = 0.05  # correctness ranks two parts only when their effects differ by at least this much
COMPLETENESS_MIN_EFFECT = 0.1  # completeness is measured where removing every finding lowers p by at least this much
NOT_APPLICABLE = "not applicable: data has no counterfactual twins"


def twin_source(datamodule: Any) -> TwinSource | None:
    """The data module's ``counterfactual_twins(ids, changes)`` (the phantom's), or ``None`` for other data."""
    source = getattr(datamodule, "counterfactual_twins", None)
    return source if callable(source) else None


def _probability(model: nn.Module, image: Tensor, classes: Tensor, task: str) -> tuple[Tensor, ModelOutput]:
    output = model(image, explain=False)
    return probabilities(output.logits, task).gather(1, classes.view(-1, 1))[:, 0], output


def correctness_pairs(importance: Tensor, effect: Tensor, present: Tensor, margin: float = EFFECT_MARGIN) -> Tensor:
    """Scores of every ranked pair of parts: 1 ordered like the effects, 0.5 equal importance, 0 reversed.

    Args:
        importance: (B, P) explanation importance of each part.
        effect: (B, P) effect of removing each part on the predicted-class probability.
        present: (B, P) bool, which parts the scan has.
        margin: Pairs whose effects differ by less are not ranked.

    Returns:
        (N,) one score per ranked pair (scan, part i < part j).
    """
    parts = importance.shape[1]
    upper = torch.ones(parts, parts, dtype=torch.bool, device=importance.device).triu(1)
    both = present.unsqueeze(2) & present.unsqueeze(1) & upper
    effect_gap = effect.unsqueeze(2) - effect.unsqueeze(1)
    importance_gap = importance.unsqueeze(2) - importance.unsqueeze(1)
    ranked = both & (effect_gap.abs() >= margin)
    agree = (importance_gap * effect_gap > 0).float() + 0.5 * (importance_gap == 0).float()
    return agree[ranked]


def top_blocks(maps: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, *S) voxels above and at-or-above the ``counts``-th largest value, and the share of the tie block needed."""
    flat = maps.flatten(1)
    ordered = flat.sort(dim=1, descending=True).values
    threshold = ordered.gather(1, (counts - 1).clamp(min=0).view(-1, 1))
    above, at_least = flat > threshold, flat >= threshold
    low, high = above.sum(dim=1), at_least.sum(dim=1)
    weight = torch.where(high > low, (counts - low).float() / (high - low).clamp(min=1).float(), torch.zeros_like(
        counts, dtype=torch.float32))
    return above.view_as(maps), at_least.view_as(maps), weight


@torch.no_grad()
def completeness_scores(model: nn.Module, image: Tensor, reference: Tensor, region: Tensor, maps: Tensor,
                        classes: Tensor, reference_effect: Tensor, task: str) -> Tensor:
    """(B,) ``clip(Δ_E / Δ_reference, 0, 1)``: the explanation's top ``|region|`` voxels replaced by ``reference``'s.

    Args:
        model: The model.
        image: (B, C, *S) scans.
        reference: (B, C, *S) their twins with every finding removed.
        region: (B, 1, *S) bool, where ``reference`` differs from ``image``.
        maps: (B, *S) explanations.
        classes: (B,) predicted classes.
        reference_effect: (B,) ``p(image) - p(reference)``, positive.
        task: How logits become probabilities.
    """
    counts = region.flatten(1).sum(dim=1)
    above, at_least, weight = top_blocks(maps, counts)
    original, _ = _probability(model, image, classes, task)
    low, _ = _probability(model, torch.where(above.unsqueeze(1), reference, image), classes, task)
    high, _ = _probability(model, torch.where(at_least.unsqueeze(1), reference, image), classes, task)
    effect = original - (low + weight * (high - low))
    return (effect / reference_effect).clamp(0.0, 1.0)


class CounterfactualMetrics(nn.Module):
    """Accumulates the counterfactual metrics over batches (module docstring); torchmetrics states, DDP-safe.

    Args:
        twins: The data's twin source (:func:`twin_source`), ``None`` for data without twins.
        concept_specs: The model's concepts (``concept_logits`` column order).
        task: How logits become probabilities.
        samples: Scans per process and evaluation that get twins (each costs about 9 forward passes).
    """

    def __init__(self, twins: TwinSource | None, concept_specs: Sequence[ConceptSpec] = (), task: str = "multiclass",
                 samples: int = 512) -> None:
        super().__init__()
        if samples < 0:
            raise ValueError(f"counterfactual_samples must be >= 0, got {samples}")
        self.twins, self.task, self.samples = twins, task, samples
        names = [spec.name for spec in concept_specs]
        data_names = [spec.name for spec in PHANTOM_CONCEPTS]
        # (data column, model column) of the concepts the model shares with the phantom; binary model columns
        self.concept_columns = {data_names.index(n): names.index(n) for n in names if n in data_names}
        self.concept_specs = list(concept_specs)
        self.binary_columns = [i for i, spec in enumerate(concept_specs) if spec.kind == "binary"]
        self.correctness, self.completeness, self.label_agreement = SampleMean(), SampleMean(), SampleMean()
        self.concept_leakage = SampleMean()
        self.effects = nn.ModuleDict({change: SampleMean() for change in TWIN_CHANGES})
        self.directions = nn.ModuleDict({data_names[column]: SampleMean() for column in CHANGED_CONCEPT.values()
                                         if column in self.concept_columns})
        self.notes: dict[str, set[str]] = defaultdict(set)
        self._seen = 0

    def reset(self) -> None:
        """Forget every batch."""
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()
        self.notes.clear()
        self._seen = 0

    @torch.no_grad()
    def update(self, model: nn.Module, output: ModelOutput, batch: Mapping[str, Any], maps: Tensor | None) -> None:
        """Measure one batch: ``output`` is ``model``'s explained output for ``batch["image"]``, ``maps`` its evidence.

        Raises:
            ValueError: when the twins' originals are not the batch's images (twins of other scans).
        """
        if self.twins is None:
            for element in ("transparency", "physical_attribution"):
                self.notes[element].add(NOT_APPLICABLE)
            return
        if output.logits is None or "id" not in batch:
            self.notes["transparency"].add("no counterfactual metrics: the model makes no logits or the batch no ids")
            return
        take = min(batch["image"].shape[0], self.samples - self._seen)
        if take <= 0:
            return
        image = batch["image"][:take]
        twins = {change: found.to(image.device) for change, found in self.twins(list(batch["id"][:take]),
                                                                                  TWIN_CHANGES).items()}
        if not torch.equal(twins[REFERENCE_CHANGE].original.to(image.dtype), image):
            raise ValueError("counterfactual twins: the twins' original scans differ from the batch's images (ids "
                             f"{list(batch['id'][:3])}...); twins must come from the data module that made the batch, "
                             "and its images must reach the model untransformed")
        self._seen += take
        logits = output.logits[:take]
        classes = logits.argmax(dim=1)
        original = probabilities(logits, self.task).gather(1, classes.view(-1, 1))[:, 0]
        effects, outputs = self._effects(model, twins, classes, original)
        if maps is None:
            self.notes["transparency"].add("no counterfactual correctness or completeness: the model returns no "
                                           "localization")
        else:
            self._explanation_checks(model, image, maps[:take], twins, classes, effects)
        concepts = output.concept_logits
        if concepts is None or not self.concept_columns or concepts.shape[1] != len(self.concept_specs):
            self.notes["physical_attribution"].add("no counterfactual concept metrics: the model predicts no phantom "
                                                   "concepts")
        else:
            self._concept_checks(unit_values(concepts[:take], self.concept_specs), batch["concepts"][:take], twins,
                                 outputs)

    def _effects(self, model: nn.Module, twins: Mapping[str, TwinBatch], classes: Tensor,
                 original: Tensor) -> tuple[dict[str, Tensor], dict[str, ModelOutput | None]]:
        """Per change: (B,) effect (NaN where it does not apply) and the model's output on the applicable twins."""
        effects, outputs = {}, {}
        for change, twin in twins.items():
            rows = twin.applicable.nonzero()[:, 0]
            effect = torch.full_like(original, float("nan"))
            outputs[change] = None
            if rows.numel():
                probability, twin_output = _probability(model, twin.image[rows], classes[rows], self.task)
                effect[rows] = original[rows] - probability
                self.effects[change].update(effect[rows])
                self.label_agreement.update((twin_output.logits.argmax(dim=1) == twin.label[rows]).float())
                outputs[change] = twin_output
            effects[change] = effect
        return effects, outputs

    def _explanation_checks(self, model: nn.Module, image: Tensor, maps: Tensor, twins: Mapping[str, TwinBatch],
                            classes: Tensor, effects: Mapping[str, Tensor]) -> None:
        importance, effect, present = [], [], []
        total, voxels = maps.flatten(1).sum(dim=1), maps[0].numel()
        for change in PART_CHANGES:
            region = twins[change].region[:, 0]
            size = region.flatten(1).sum(dim=1)
            # the map's mass on the part beyond what a uniform map of the same total would put there
            importance.append((maps * region).flatten(1).sum(dim=1) - total * size / voxels)
            effect.append(effects[change].nan_to_num(0.0))
            present.append(twins[change].applicable & (size > 0))
        pairs = correctness_pairs(torch.stack(importance, 1), torch.stack(effect, 1), torch.stack(present, 1))
        if pairs.numel():
            self.correctness.update(pairs)
        reference = twins[REFERENCE_CHANGE]
        reference_effect = effects[REFERENCE_CHANGE]
        rows = (reference.applicable & (reference_effect >= COMPLETENESS_MIN_EFFECT)).nonzero()[:, 0]
        if rows.numel():
            self.completeness.update(completeness_scores(
                model, image[rows], reference.image[rows], reference.region[rows], maps[rows], classes[rows],
                reference_effect[rows], self.task))

    def _concept_checks(self, predicted: Tensor, true: Tensor, twins: Mapping[str, TwinBatch],
                        outputs: Mapping[str, ModelOutput | None]) -> None:
        data_names = [spec.name for spec in PHANTOM_CONCEPTS]
        for change, data_column in CHANGED_CONCEPT.items():
            twin, twin_output = twins[change], outputs[change]
            if twin_output is None or twin_output.concept_logits is None:
                continue
            rows = twin.applicable.nonzero()[:, 0]
            after = unit_values(twin_output.concept_logits, self.concept_specs)
            moved = after - predicted[rows]
            if data_column in self.concept_columns:
                column = self.concept_columns[data_column]
                truth = twin.concepts[rows, data_column] - true[rows, data_column].to(twin.concepts.dtype)
                self.directions[data_names[data_column]].update((moved[:, column] * truth > 0).float())
            others = [c for c in self.binary_columns if c != self.concept_columns.get(data_column)]
            if others:
                self.concept_leakage.update(moved[:, others].abs().mean(dim=1))

    def compute(self) -> tuple[list[MetricResult], dict[str, set[str]]]:
        """The measured rows (single metrics ``None`` where not measured; family members where measured) and notes."""
        def value(metric: SampleMean) -> float | None:
            return float(metric.compute()) if int(metric.count) > 0 else None

        rows = [MetricResult.of(name, value(metric)) for name, metric in (
            ("counterfactual_correctness", self.correctness), ("counterfactual_completeness", self.completeness),
            ("counterfactual_label_agreement", self.label_agreement),
            ("counterfactual_concept_leakage", self.concept_leakage))]
        rows += [MetricResult.of(f"counterfactual_effect/{change}", value(metric))
                 for change, metric in self.effects.items() if int(metric.count) > 0]
        directions = [metric for metric in self.directions.values() if int(metric.count) > 0]
        pooled = sum(float(m.total) for m in directions) / max(sum(int(m.count) for m in directions), 1)
        rows.append(MetricResult.of("counterfactual_concept_direction", pooled if directions else None))
        rows += [MetricResult.of(f"counterfactual_concept_direction/{concept}", value(metric))
                 for concept, metric in self.directions.items() if int(metric.count) > 0]
        return rows, {element: set(found) for element, found in self.notes.items()}
