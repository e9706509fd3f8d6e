from __future__ import annotations

import pytest
import torch
from synthetic import make_batch

from pellucid.models import ConceptSpec, create_model
from pellucid.training.concepts.interventions import (
    InterventionCurve,
    concept_groups,
    evaluate_interventions,
    intervention_logits,
    intervention_masks,
    num_steps,
)

SPECS = [
    ConceptSpec("size_mm", "continuous", "mm", "size"),
    ConceptSpec("lobulated", "binary", None, "shape"),
    ConceptSpec("spiky", "binary", None, "shape"),
    ConceptSpec("bright", "binary", None, None),
]


def test_groups_follow_first_appearance_and_ungrouped_concepts_stand_alone() -> None:
    assert concept_groups(SPECS) == [[0], [1, 2], [3]]
    assert num_steps("group", SPECS) == 3 and num_steps("random", SPECS) == 4


def test_random_masks_add_one_concept_per_step_in_per_sample_orders() -> None:
    masks = intervention_masks("random", SPECS, torch.zeros(64, 4), torch.Generator().manual_seed(0))
    assert masks.shape == (5, 64, 4) and not masks[0].any() and masks[-1].all()
    assert torch.equal(masks.sum(dim=2), torch.arange(5).view(-1, 1).expand(5, 64))
    assert bool((masks[1:] >= masks[:-1]).all())  # cumulative
    assert len({tuple(m.tolist()) for m in masks[1]}) == 4  # different samples start with different concepts


def test_uncertainty_policy_corrects_the_least_certain_binary_concept_first() -> None:
    logits = torch.tensor([[7.0, 0.1, -3.0, 2.0], [0.0, -5.0, 0.5, 4.0]])
    masks = intervention_masks("uncertainty", SPECS, logits)
    first = [row.nonzero().flatten().tolist() for row in masks[1]]
    assert first == [[1], [2]]
    assert [row.nonzero().flatten().tolist() for row in masks[3]] == [[1, 2, 3], [1, 2, 3]]
    assert masks[4].all()  # the continuous concept (no uncertainty) comes last
    with pytest.raises(ValueError, match="policy must be one of"):
        intervention_masks("loudest", SPECS, logits)


def test_group_policy_corrects_whole_groups() -> None:
    masks = intervention_masks("group", SPECS, torch.zeros(32, 4), torch.Generator().manual_seed(1))
    assert masks.shape == (4, 32, 4)
    assert torch.equal(masks[..., 1], masks[..., 2])  # one group: always corrected together
    assert torch.equal(masks[-1], torch.ones(32, 4, dtype=torch.bool))


def test_curve_averages_steps_over_trials_and_reports_auc_gain_and_monotonicity() -> None:
    curve = InterventionCurve(num_steps=2)
    label = torch.tensor([0, 1])
    right, wrong = torch.tensor([[5.0, 0.0], [0.0, 5.0]]), torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    half = torch.tensor([[5.0, 0.0], [5.0, 0.0]])
    curve.update(torch.stack([torch.stack([wrong, half, right]), torch.stack([wrong, right, right])]), label)
    result = curve.compute()
    torch.testing.assert_close(result["accuracy"], torch.tensor([0.0, 0.75, 1.0]))
    torch.testing.assert_close(result["auc"], torch.tensor((0.0 + 0.75) / 4 + (0.75 + 1.0) / 4))
    assert float(result["gain"]) == 1.0 and float(result["monotonic"]) == 1.0
    falling = InterventionCurve(num_steps=1)
    falling.update(torch.stack([right, wrong]), label)
    assert float(falling.compute()["monotonic"]) == 0.0
    with pytest.raises(ValueError, match=r"step_logits: expected \(trials, 3, B, K\)"):
        curve.update(torch.zeros(2, 2, 2), label)


def rule_model():
    """A cbm whose head reads only ``lobulated``: class 1 if present, else class 0."""
    torch.manual_seed(0)
    model = create_model("cbm", 2, in_channels=1, num_classes=2, concepts=SPECS,
                         backbone_kwargs={"channels": [4], "strides": [2]})
    with torch.no_grad():
        model.label_head.linear.weight.zero_()
        model.label_head.linear.weight[1, 1] = 20.0
        model.label_head.linear.bias.copy_(torch.tensor([0.0, -10.0]))
    return model.eval()


def test_correcting_every_concept_gives_the_rule_label_and_nan_is_never_corrected() -> None:
    model = rule_model()
    batch = make_batch(2, batch_size=16, concepts=SPECS, seed=3)
    batch["label"] = batch["concepts"][:, 1].long()
    result = evaluate_interventions(model.train(), [batch], "random", trials=2, seed=0)
    assert model.training  # restored
    assert float(result["accuracy"][-1]) == 1.0 and result["accuracy"].shape == (5,)
    unknown = batch["concepts"].clone()
    unknown[:, 1] = float("nan")
    steps = intervention_logits(model.eval(), batch["image"], unknown, "group")
    torch.testing.assert_close(steps[0, -1].argmax(1), steps[0, 0].argmax(1))  # lobulated unknown: never set
