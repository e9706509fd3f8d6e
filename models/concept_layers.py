"""Pieces every concept model shares: the concept bank (specs, normalisation, loss, interventions) and the label head.

Concept values live in three spaces, named consistently throughout:

- **unit** values: what users, batches and ``ModelOutput.concept_logits`` speak: a logit (in ``concept_logits``) or a
  0/1 value or probability (in batches and interventions) for binary concepts; a value in the concept's unit
  (``"mm"``) for continuous ones. NaN in a batch means "not annotated".
- **raw** values: what a concept layer predicts: a logit for binary concepts, a z-score for continuous ones
  (normalised with running statistics of the training targets, so every concept's regression works on one scale).
- **activations**: what the label head reads: the probability for binary concepts, the z-score for continuous ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pellucid.models.base import InputError
from pellucid.models.concepts import ConceptSpec, as_concept_spec
from pellucid.models.maps import resize_maps

# Used when a concept model is built without concepts (e.g. by the generic registry tests); a dataset's own
# specifications replace it (InterpretableModule passes the data module's ``concept_specs``).
DEFAULT_CONCEPTS: tuple[ConceptSpec, ...] = (
    ConceptSpec("finding", "binary", None, "finding", "A finding is present."),
    ConceptSpec("size_mm", "continuous", "mm", "size", "Size of the finding in mm; 0 without finding."),
)
_PROBABILITY_EPS = 1e-6  # keeps logit(0) and logit(1) finite when a user sets a binary concept to exactly 0 or 1


def resolve_concepts(concepts: Sequence[ConceptSpec | dict[str, Any]] | None) -> list[ConceptSpec]:
    """Return concept specifications from specs or their dict form; ``None`` gives :data:`DEFAULT_CONCEPTS`.

    Raises:
        ValueError: if the list is empty or names a concept twice.
    """
    specs = list(DEFAULT_CONCEPTS) if concepts is None else [as_concept_spec(c) for c in concepts]
    if not specs:
        raise ValueError("concepts: expected at least one concept specification, got an empty list")
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"concepts: names must be unique, got {duplicates} more than once")
    return specs


ModelBuilder = TypeVar("ModelBuilder", bound=Callable[..., Any])
_TAKES_CONCEPTS = "takes_concepts"


def takes_concepts(builder: ModelBuilder) -> ModelBuilder:
    """Declare that a model builder takes the data's concept specifications as its ``concepts`` keyword.

    The training module passes the data module's concepts (in the batch's column order) only to builders declared
    so, whatever their signature: a builder that forwards ``**kwargs`` to a concept model gets the data's concepts
    too, instead of silently falling back to :data:`DEFAULT_CONCEPTS`. Stack it with ``@register_model`` in either
    order.
    """
    setattr(builder, _TAKES_CONCEPTS, True)
    return builder


def builder_takes_concepts(builder: Callable[..., Any]) -> bool:
    """Whether ``builder`` was declared with :func:`takes_concepts`."""
    return getattr(builder, _TAKES_CONCEPTS, False) is True


def unit_values(concept_logits: Tensor, specs: Sequence[ConceptSpec]) -> Tensor:
    """(B, M) ``concept_logits`` -> values in the concepts' units: probabilities for binary, unchanged otherwise."""
    binary = torch.tensor([spec.kind == "binary" for spec in specs], device=concept_logits.device)
    return torch.where(binary, concept_logits.sigmoid(), concept_logits)


class ConceptBank(nn.Module):
    """The concept specifications of a model and the running statistics of its continuous concepts.

    Continuous concepts are predicted as z-scores ``(value - mean) / std``. ``mean`` and ``std`` are estimated from
    the training targets the model sees (annotated values only) and frozen after ``max_count`` values per concept,
    so the scale is fixed after the first few batches. For binary concepts ``mean`` is the share of positives, used
    for class-balanced binary cross-entropy. The statistics are buffers and the specifications extra state: both
    travel in the ``state_dict`` and in checkpoints.

    Args:
        concepts: The concept specifications, in the order of the batch's ``concepts`` columns.
        max_count: Annotated values per concept after which its statistics stop changing.
    """

    def __init__(self, concepts: Sequence[ConceptSpec], max_count: int = 2048) -> None:
        super().__init__()
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count!r}")
        self.concept_specs = list(concepts)
        self.max_count = max_count
        self.register_buffer("is_binary", torch.tensor([s.kind == "binary" for s in concepts]), persistent=False)
        self.register_buffer("count", torch.zeros(len(concepts)))
        self.register_buffer("mean", torch.zeros(len(concepts)))
        self.register_buffer("sum_squares", torch.zeros(len(concepts)))  # of deviations from the mean (Welford)

    @property
    def num_concepts(self) -> int:
        """Number of concepts ``M``."""
        return len(self.concept_specs)

    @property
    def std(self) -> Tensor:
        """(M,) standard deviation of each concept's training targets (1 until two values were seen)."""
        variance = self.sum_squares / self.count.clamp_min(1)
        return torch.where(self.count > 1, variance.sqrt(), torch.ones_like(variance)).clamp_min(1e-6)

    def get_extra_state(self) -> dict[str, Any]:
        """The specifications as plain dicts (the checkpoint holds no custom classes)."""
        return {"concepts": [spec.to_dict() for spec in self.concept_specs], "max_count": self.max_count}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Check that the saved specifications are the ones this model was built with.

        Raises:
            ValueError: naming both lists when they differ (build the model with the checkpoint's ``concepts``).
        """
        saved = [as_concept_spec(c) for c in state["concepts"]]
        if saved != self.concept_specs:
            raise ValueError(f"concept specifications in the state_dict ({[s.name for s in saved]}) differ from the "
                             f"model's ({[s.name for s in self.concept_specs]}); build the model with "
                             "concepts=<the checkpoint's concepts>")
        self.max_count = int(state["max_count"])

    @torch.no_grad()
    def update(self, targets: Tensor) -> None:
        """Merge a batch of (B, M) unit targets (NaN skipped) into the statistics of unfrozen concepts."""
        annotated = ~torch.isnan(targets)
        batch_count = annotated.sum(dim=0).to(self.count.dtype)
        values = torch.where(annotated, targets, torch.zeros_like(targets))
        batch_mean = values.sum(dim=0) / batch_count.clamp_min(1)
        deviations = torch.where(annotated, targets - batch_mean, torch.zeros_like(targets))
        batch_squares = (deviations**2).sum(dim=0)
        active = (self.count < self.max_count) & (batch_count > 0)
        total = self.count + batch_count
        delta = batch_mean - self.mean
        new_mean = self.mean + delta * batch_count / total.clamp_min(1)
        new_squares = self.sum_squares + batch_squares + delta**2 * self.count * batch_count / total.clamp_min(1)
        self.mean.copy_(torch.where(active, new_mean, self.mean))
        self.sum_squares.copy_(torch.where(active, new_squares, self.sum_squares))
        self.count.copy_(torch.where(active, total, self.count))

    # ------------------------------------------------------------------------------ conversions between spaces
    def raw_to_unit(self, raw: Tensor) -> Tensor:
        """(B, M) raw -> unit: binary logits unchanged, continuous z-scores to values in their unit."""
        return torch.where(self.is_binary, raw, raw * self.std + self.mean)

    def unit_to_raw(self, values: Tensor) -> Tensor:
        """(B, M) unit -> raw: binary 0/1 or probability to a logit, continuous value to a z-score."""
        probability = values.clamp(_PROBABILITY_EPS, 1 - _PROBABILITY_EPS)
        return torch.where(self.is_binary, torch.logit(probability), (values - self.mean) / self.std)

    def logits_to_raw(self, concept_logits: Tensor) -> Tensor:
        """(B, M) ``concept_logits`` (logit or unit value) -> raw, the inverse of :meth:`raw_to_unit`."""
        return torch.where(self.is_binary, concept_logits, (concept_logits - self.mean) / self.std)

    def activations(self, raw: Tensor) -> Tensor:
        """(B, M) raw -> what the label head reads: probability (binary) or z-score (continuous)."""
        return torch.where(self.is_binary, torch.sigmoid(raw), raw)

    def unit_to_activations(self, values: Tensor) -> Tensor:
        """(B, M) unit values (0/1 or probability; value in unit) -> label-head activations."""
        return torch.where(self.is_binary, values, (values - self.mean) / self.std)

    # ------------------------------------------------------------------------------------------ batch inputs
    def targets(self, batch: Mapping[str, Any], batch_size: int) -> Tensor:
        """The batch's (B, M) ``concepts`` after checking their presence and shape.

        Raises:
            KeyError: if the batch has no ``concepts``.
            ValueError: naming the expected and actual shape.
        """
        if "concepts" not in batch:
            raise KeyError(f"concept model: the batch needs 'concepts' ({batch_size}, {self.num_concepts}) "
                           f"for {[s.name for s in self.concept_specs]}; it has keys {sorted(batch)}")
        targets = batch["concepts"]
        if targets.shape != (batch_size, self.num_concepts):
            raise ValueError(f"batch['concepts']: expected shape ({batch_size}, {self.num_concepts}) for concepts "
                             f"{[s.name for s in self.concept_specs]}, got {tuple(targets.shape)}")
        return targets.float()

    def check_intervention(
        self, concept_mask: Tensor | None, concept_values: Tensor | None, batch_size: int
    ) -> tuple[Tensor, Tensor] | None:
        """Validate intervention arguments; return ``(mask, values)`` with NaN values outside the mask zeroed.

        Raises:
            InputError: naming the argument, expected and actual shape, dtype or value.
        """
        if concept_mask is None and concept_values is None:
            return None
        if concept_mask is None or concept_values is None:
            given, missing = ("concept_values", "concept_mask") if concept_mask is None else ("concept_mask",
                                                                                            "concept_values")
            raise InputError(f"interventions need both concept_mask and concept_values; got {given} without {missing}")
        shape = (batch_size, self.num_concepts)
        for name, value in (("concept_mask", concept_mask), ("concept_values", concept_values)):
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                raise InputError(f"{name}: expected a tensor of shape {shape} (batch, concepts "
                                 f"{[s.name for s in self.concept_specs]}), got {getattr(value, 'shape', value)!r}")
        if concept_mask.dtype != torch.bool:
            raise InputError(f"concept_mask: expected dtype torch.bool, got {concept_mask.dtype}")
        values = concept_values.float()
        if not bool(torch.isfinite(values.detach()[concept_mask]).all()):
            raise InputError("concept_values: expected finite values wherever concept_mask is True, got NaN or inf")
        values = torch.where(concept_mask, values, torch.zeros_like(values))
        binary_set = values.detach()[concept_mask & self.is_binary]
        if binary_set.numel() and (float(binary_set.min()) < 0 or float(binary_set.max()) > 1):
            raise InputError("concept_values: binary concepts take a value in [0, 1] (0 absent, 1 present, or a "
                             f"probability), got range [{float(binary_set.min()):g}, {float(binary_set.max()):g}]")
        return concept_mask, values

    def intervene(self, raw: Tensor, intervention: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Apply a checked intervention to predicted raw values.

        Returns:
            ``(raw, activations)``: raw values with the set concepts replaced (a binary value ``v`` becomes
            ``logit(v)``), and the label head's activations (exactly ``v`` for a binary concept set to ``v``).
        """
        activations = self.activations(raw)
        if intervention is None:
            return raw, activations
        mask, values = intervention
        raw = torch.where(mask, self.unit_to_raw(values), raw)
        activations = torch.where(mask, self.unit_to_activations(values), activations)
        return raw, activations

    # ------------------------------------------------------------------------------------------------ loss
    def loss(self, raw: Tensor, targets: Tensor, balanced: bool = True) -> Tensor:
        """Concept loss: (class-balanced) BCE for binary concepts, MSE of z-scores for continuous ones.

        Each concept's loss is averaged over its annotated samples (NaN targets are masked out); the term is the
        mean over the concepts annotated in the batch (0, still part of the graph, when none is).

        Args:
            raw: (B, M) predicted raw values (logits / z-scores).
            targets: (B, M) unit targets, NaN where not annotated.
            balanced: Weigh positives and negatives of each binary concept by half the inverse of their share
                (estimated like the statistics), so rare findings count as much as common ones.
        """
        annotated = ~torch.isnan(targets)
        filled = torch.where(annotated, targets, torch.zeros_like(targets))
        binary_targets = filled.clamp(0, 1)
        bce = F.binary_cross_entropy_with_logits(raw, binary_targets, reduction="none")
        squared = (raw - (filled - self.mean) / self.std) ** 2
        per_sample = torch.where(self.is_binary, bce, squared)
        weights = annotated.to(raw.dtype)
        if balanced:
            positive_share = torch.where(self.count > 0, self.mean, torch.full_like(self.mean, 0.5)).clamp(0.02, 0.98)
            class_weight = binary_targets * 0.5 / positive_share + (1 - binary_targets) * 0.5 / (1 - positive_share)
            weights = weights * torch.where(self.is_binary, class_weight, torch.ones_like(class_weight))
        weight_sum = weights.sum(dim=0)
        per_concept = (per_sample * weights).sum(dim=0) / weight_sum.clamp_min(1e-12)
        present = weight_sum > 0
        if not bool(present.any()):
            return raw.sum() * 0.0
        return per_concept[present].mean()


class LinearLabelHead(nn.Module):
    """The transparent concept-to-label head: ``logits = W a + b`` over the concept activations ``a``.

    ``a`` holds probabilities of binary concepts and z-scores of continuous ones; :meth:`unit_weights` rewrites
    the head per unit (per "present" and per mm), and :meth:`describe` prints it as readable lines.

    Args:
        num_concepts: ``M``.
        num_classes: ``K``.
    """

    def __init__(self, num_concepts: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_concepts, num_classes)

    def forward(self, activations: Tensor) -> Tensor:
        """(B, M) activations -> (B, K) logits."""
        return self.linear(activations)

    def l1_penalty(self) -> Tensor:
        """Sum of absolute weights (the sparsity term; the bias is not penalised)."""
        return self.linear.weight.abs().sum()

    @torch.no_grad()
    def unit_weights(self, bank: ConceptBank) -> tuple[Tensor, Tensor]:
        """The same linear map written on unit values: ``logits = W_u v + b_u``.

        Returns:
            ``(W_u, b_u)``: (K, M) weights per "present" (binary) or per unit (continuous), and (K,) biases.
        """
        weight, bias = self.linear.weight.detach(), self.linear.bias.detach()
        scale = torch.where(bank.is_binary, torch.ones_like(bank.std), 1.0 / bank.std)
        offset = torch.where(bank.is_binary, torch.zeros_like(bank.mean), bank.mean / bank.std)
        return weight * scale, bias - weight @ offset

    def table(self, bank: ConceptBank, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One row per (class, concept) and one per class bias: ``{"class", "concept", "weight", "per"}``.

        ``per`` reads ``"present"`` for binary concepts and ``"<unit>"`` for continuous ones; the bias row has
        concept ``"(bias)"``.
        """
        weights, biases = self.unit_weights(bank)
        names = list(class_names) if class_names is not None else [f"class {k}" for k in range(weights.shape[0])]
        if len(names) != weights.shape[0]:
            raise ValueError(f"class_names: expected {weights.shape[0]} names, got {len(names)}")
        rows = []
        for k, class_name in enumerate(names):
            for m, spec in enumerate(bank.concept_specs):
                per = "present" if spec.kind == "binary" else (spec.unit or "unit")
                rows.append({"class": class_name, "concept": spec.name, "weight": float(weights[k, m]), "per": per})
            rows.append({"class": class_name, "concept": "(bias)", "weight": float(biases[k]), "per": ""})
        return rows

    def describe(self, bank: ConceptBank, class_names: Sequence[str] | None = None, min_abs: float = 0.0) -> str:
        """The head as readable lines, strongest terms first.

        Example: ``malignant: +2.10 spiculated, +0.80 per mm diameter_mm, -1.20 calcified, bias -3.10``.

        Args:
            bank: The model's concept bank (for units and normalisation).
            class_names: ``K`` names (default ``class 0``, ...).
            min_abs: Leave out terms whose weight is smaller than this in absolute value.
        """
        lines: dict[str, list[str]] = {}
        bias: dict[str, float] = {}
        for row in sorted(self.table(bank, class_names), key=lambda r: -abs(r["weight"])):
            if row["concept"] == "(bias)":
                bias[row["class"]] = row["weight"]
            elif abs(row["weight"]) >= min_abs:
                per = "" if row["per"] == "present" else f"per {row['per']} "
                lines.setdefault(row["class"], []).append(f"{row['weight']:+.2f} {per}{row['concept']}")
        order = list(dict.fromkeys(row["class"] for row in self.table(bank, class_names)))
        return "\n".join(f"{name}: {', '.join(lines.get(name, []) + [f'bias {bias[name]:+.2f}'])}" for name in order)


def scale_to_unit(maps: Tensor) -> Tensor:
    """Clamp (B, K, *s) evidence at 0 and divide each map by its maximum (a map without evidence stays 0)."""
    positive = maps.clamp_min(0)
    peak = positive.flatten(2).amax(dim=2).view(*maps.shape[:2], *([1] * (maps.ndim - 2)))  # amax: no indices
    # dividing by inf keeps a map without evidence at 0 without a full-size torch.where
    return positive / torch.where(peak > 0, peak, torch.full_like(peak, math.inf))


def evidence_to_localization(class_evidence: Tensor, size: Sequence[int]) -> Tensor:
    """(B, K, *s) signed class evidence -> (B, K, *S) localization in [0, 1] at input resolution ``size``."""
    return scale_to_unit(resize_maps(class_evidence, size)).clamp_(0.0, 1.0)
