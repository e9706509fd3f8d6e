"""Concept interventions: which concepts a user corrects first, and how the task metric responds.

A concept model takes interventions as explicit forward arguments, ``model(x, concept_mask=m, concept_values=v)``.
Here they are driven by a policy:

- ``"random"``: concepts in a random order, drawn per sample and trial.
- ``"uncertainty"``: the most uncertain concept first: binary concepts by ``1 - |2p - 1|`` (``p`` the predicted
  probability); continuous concepts carry no predictive uncertainty (a point estimate) and come after every binary
  concept, in specification order; pass your own ``uncertainty`` to rank them otherwise.
- ``"group"``: whole concept groups (``ConceptSpec.group``; a concept without group is a group of its own), in a
  random order drawn per sample and trial. The curve's steps count groups instead of concepts.

:class:`InterventionCurve` is a torchmetrics metric of task accuracy versus the number of concepts (or groups)
corrected, averaged over trials, with its normalised area under the curve and the gain from correcting everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from pellucid.models import InterpretableModel
from pellucid.models.concepts import ConceptSpec

Policy = Literal["random", "uncertainty", "group"]
POLICIES: tuple[str, ...] = ("random", "uncertainty", "group")


def concept_groups(concepts: Sequence[ConceptSpec]) -> list[list[int]]:
    """Column indices per group, groups in order of first appearance; ungrouped concepts form their own group."""
    groups: dict[str, list[int]] = {}
    for index, spec in enumerate(concepts):
        groups.setdefault(spec.group if spec.group is not None else f"\0{spec.name}", []).append(index)
    return list(groups.values())


def concept_uncertainty(concept_logits: Tensor, concepts: Sequence[ConceptSpec]) -> Tensor:
    """(B, M) uncertainty in [0, 1] for binary concepts (1 at p = 0.5); -1 for continuous ones (ranked last)."""
    is_binary = torch.tensor([s.kind == "binary" for s in concepts], device=concept_logits.device)
    binary = 1 - (2 * torch.sigmoid(concept_logits) - 1).abs()
    return torch.where(is_binary, binary, torch.full_like(binary, -1.0))


def intervention_masks(
    policy: Policy,
    concepts: Sequence[ConceptSpec],
    concept_logits: Tensor,
    generator: torch.Generator | None = None,
    uncertainty: Tensor | None = None,
) -> Tensor:
    """Cumulative intervention masks: ``masks[k]`` marks the concepts corrected after ``k`` steps.

    Args:
        policy: ``"random"``, ``"uncertainty"`` or ``"group"`` (see the module docstring).
        concepts: The model's concept specifications.
        concept_logits: (B, M) the model's predictions (the uncertainty policy ranks by them).
        generator: Random generator for the random orders (CPU); ``None`` uses the global one.
        uncertainty: Optional (B, M) uncertainty replacing :func:`concept_uncertainty` (higher = corrected first).

    Returns:
        (S + 1, B, M) bool with ``S = M`` steps, or the number of groups for ``"group"``; ``masks[0]`` is all False.

    Raises:
        ValueError: for an unknown policy or a mismatched shape.
    """
    batch, count = concept_logits.shape
    if count != len(concepts):
        raise ValueError(f"concept_logits: expected {len(concepts)} concepts on axis 1, got shape "
                         f"{tuple(concept_logits.shape)}")
    if policy == "group":
        groups = concept_groups(concepts)
        order = torch.rand(batch, len(groups), generator=generator).argsort(dim=1)
        membership = torch.zeros(len(groups), count, dtype=torch.bool)
        for g, columns in enumerate(groups):
            membership[g, columns] = True
        steps = [torch.zeros(batch, count, dtype=torch.bool)]
        for k in range(len(groups)):
            steps.append(steps[-1] | membership[order[:, k]])
        return torch.stack(steps).to(concept_logits.device)
    if policy == "random":
        order = torch.rand(batch, count, generator=generator).argsort(dim=1)
    elif policy == "uncertainty":
        scores = concept_uncertainty(concept_logits, concepts) if uncertainty is None else uncertainty
        if scores.shape != concept_logits.shape:
            raise ValueError(f"uncertainty: expected shape {tuple(concept_logits.shape)}, got {tuple(scores.shape)}")
        order = scores.detach().cpu().argsort(dim=1, descending=True, stable=True)
    else:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    rank = order.argsort(dim=1)  # rank[b, m] = step at which concept m is corrected (0-based)
    steps = torch.arange(count + 1).view(-1, 1, 1)
    return (rank.unsqueeze(0) < steps).to(concept_logits.device)


def intervention_concepts(model: InterpretableModel) -> list[ConceptSpec]:
    """The model's ``concept_specs`` after checking, through the protocol, that it accepts interventions.

    Raises:
        ValueError: naming the model, when it sets no concepts or does not accept interventions.
    """
    specs = model.concept_specs
    if not specs or not model.accepts_interventions():
        raise ValueError(f"interventions: {model.name} must set concept_specs and accept interventions "
                         f"(accepts_interventions() is {model.accepts_interventions()}, concept_specs is {specs!r}); "
                         "use a concept model such as cbm or cem")
    return list(specs)


@torch.no_grad()
def intervention_logits(
    model: InterpretableModel,
    image: Tensor,
    true_concepts: Tensor,
    policy: Policy,
    trials: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Class logits after each intervention step, for ``trials`` draws of the policy.

    Concepts whose true value is NaN (not annotated) are never corrected, so a step may correct fewer concepts.

    Args:
        model: A concept model: sets ``concept_specs`` and accepts interventions (``accepts_interventions()``: its
            forward takes ``concept_mask`` and ``concept_values``).
        image: (B, C, *S) images.
        true_concepts: (B, M) true values in the concepts' units, NaN where not annotated.
        policy: ``"random"``, ``"uncertainty"`` or ``"group"``.
        trials: Independent draws of the policy's random order.
        generator: Random generator for the orders.

    Returns:
        (trials, S + 1, B, K) logits; step 0 is the model without intervention.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials!r}")
    specs = intervention_concepts(model)
    plain = model(image, explain=False)
    annotated = ~torch.isnan(true_concepts)
    per_trial = []
    for _ in range(trials):
        masks = intervention_masks(policy, specs, plain.concept_logits, generator) & annotated
        steps = [plain.logits]
        for mask in masks[1:]:
            steps.append(model(image, explain=False, concept_mask=mask, concept_values=true_concepts).logits)
        per_trial.append(torch.stack(steps))
    return torch.stack(per_trial)


class InterventionCurve(Metric):
    """Task accuracy versus the number of concepts (or groups) corrected, averaged over samples and trials.

    ``compute()`` returns ``accuracy`` ((S + 1,) per step), ``auc`` (area under the accuracy curve with the step
    axis scaled to [0, 1]), ``gain`` (accuracy with every step corrected minus without intervention) and
    ``monotonic`` (1.0 when the mean curve never falls from one step to the next, else 0.0).

    Args:
        num_steps: ``S``, the number of intervention steps (concepts, or groups for the group policy).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps!r}")
        self.num_steps = num_steps
        self.add_state("correct", default=torch.zeros(num_steps + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_steps + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, step_logits: Tensor, label: Tensor) -> None:
        """Add (trials, S + 1, B, K) or (S + 1, B, K) logits and the (B,) class labels."""
        if step_logits.ndim == 3:
            step_logits = step_logits.unsqueeze(0)
        if step_logits.ndim != 4 or step_logits.shape[1] != self.num_steps + 1:
            raise ValueError(f"step_logits: expected (trials, {self.num_steps + 1}, B, K), got "
                             f"{tuple(step_logits.shape)}")
        if label.ndim != 1 or label.shape[0] != step_logits.shape[2]:
            raise ValueError(f"label: expected ({step_logits.shape[2]},) class indices, got {tuple(label.shape)} "
                             "(intervention curves measure multi-class accuracy)")
        hits = (step_logits.argmax(dim=3) == label.view(1, 1, -1)).to(torch.float64)
        self.correct += hits.sum(dim=(0, 2))
        self.total += float(hits.shape[0] * hits.shape[2])

    def compute(self) -> dict[str, Tensor]:
        """Accuracy per step, normalised area under the curve, gain and monotonicity."""
        accuracy = self.correct / self.total.clamp_min(1)
        area = torch.trapezoid(accuracy, dx=1.0 / self.num_steps)
        monotonic = bool((accuracy[1:] >= accuracy[:-1] - 1e-12).all())
        return {"accuracy": accuracy.float(), "auc": area.float(), "gain": (accuracy[-1] - accuracy[0]).float(),
                "monotonic": torch.tensor(float(monotonic))}


def num_steps(policy: Policy, concepts: Sequence[ConceptSpec]) -> int:
    """Steps of a full intervention curve: the number of concepts, or of groups for the group policy."""
    return len(concept_groups(concepts)) if policy == "group" else len(concepts)


@torch.no_grad()
def evaluate_interventions(
    model: InterpretableModel,
    batches: Iterable[Mapping[str, Any]],
    policy: Policy,
    trials: int = 3,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Run a full intervention curve over ``batches`` (with ``image``, ``concepts`` and ``label``) in eval mode.

    Returns:
        What :meth:`InterventionCurve.compute` returns.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        curve = InterventionCurve(num_steps(policy, intervention_concepts(model))).to(device)
        generator = torch.Generator().manual_seed(seed)
        for batch in batches:
            image, truth = batch["image"].to(device), batch["concepts"].to(device).float()
            curve.update(intervention_logits(model, image, truth, policy, trials, generator), batch["label"].to(device))
        return curve.compute()
    finally:
        model.train(was_training)
