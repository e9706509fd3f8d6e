from __future__ import annotations

import math

import pytest
import torch

from pellucid.models import ConceptSpec, create_model
from pellucid.training.elements.physical_attribution import (
    ConceptMetrics,
    LeakageCheck,
    hard_concept_values,
    head_rule_agreement,
    soft_and_hard_logits,
)

SPECS = [ConceptSpec("diameter_mm", "continuous", "mm"), ConceptSpec("contrast", "continuous", "a.u."),
         ConceptSpec("spiky", "binary"), ConceptSpec("bright", "binary")]
NAN = float("nan")


def test_per_concept_accuracy_auroc_and_error_in_the_unit_with_nan_masked() -> None:
    metric = ConceptMetrics(SPECS)
    predictions = torch.tensor([[10.0, 0.5, 3.0, -1.0], [4.0, 0.2, -2.0, 2.0], [7.0, 0.9, 1.0, -3.0]])
    targets = torch.tensor([[12.0, 0.5, 1.0, 0.0], [5.0, NAN, 0.0, 1.0], [NAN, 0.6, 0.0, 0.0]])
    metric.update(predictions[:2], targets[:2])
    metric.update(predictions[2:], targets[2:])
    result = metric.compute()
    torch.testing.assert_close(result["diameter_mm/mae_mm"], torch.tensor(1.5))  # the NaN row is left out
    torch.testing.assert_close(result["contrast/mae_au"], torch.tensor(0.15))
    torch.testing.assert_close(result["spiky/accuracy"], torch.tensor(2 / 3))
    torch.testing.assert_close(result["spiky/auroc"], torch.tensor(1.0))  # ranking right, threshold wrong
    torch.testing.assert_close(result["bright/accuracy"], torch.tensor(1.0))
    torch.testing.assert_close(result["binary_accuracy"], torch.tensor(5 / 6))
    assert set(result) == {"diameter_mm/mae_mm", "contrast/mae_au", "spiky/accuracy", "spiky/auroc", "bright/accuracy",
                           "bright/auroc", "binary_accuracy", "binary_auroc"}


def test_single_class_auroc_and_unannotated_concepts_are_nan() -> None:
    metric = ConceptMetrics(SPECS)
    metric.update(torch.zeros(2, 4), torch.tensor([[NAN, 1.0, 1.0, NAN], [NAN, 1.0, 1.0, NAN]]))
    result = metric.compute()
    assert math.isnan(result["spiky/auroc"]) and math.isnan(result["diameter_mm/mae_mm"])
    assert math.isnan(result["bright/accuracy"]) and float(result["spiky/accuracy"]) == 0.0
    with pytest.raises(ValueError, match=r"targets expected shape \(2, 4\).*got \(2, 3\)"):
        metric.update(torch.zeros(2, 4), torch.zeros(2, 3))


def test_leakage_check_compares_soft_and_hard_accuracy() -> None:
    metric = LeakageCheck()
    label = torch.tensor([0, 1, 1, 0])
    soft = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]])
    hard = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    metric.update(soft, hard, label)
    result = metric.compute()
    assert float(result["soft_accuracy"]) == 1.0 and float(result["hard_accuracy"]) == 0.5
    assert float(result["leakage_gap"]) == 0.5


def small_cbm():
    torch.manual_seed(0)
    return create_model("cbm", 2, in_channels=1, num_classes=2, concepts=SPECS,
                        backbone_kwargs={"channels": [4], "strides": [2]}).eval()


def test_hard_values_threshold_binary_concepts_only_and_drive_the_hard_forward() -> None:
    logits = torch.tensor([[12.5, 0.4, 0.3, -0.2]])
    assert hard_concept_values(logits, SPECS).tolist() == [[12.5, pytest.approx(0.4), 1.0, 0.0]]
    model = small_cbm()
    image = torch.randn(3, 1, 16, 16)
    soft, hard = soft_and_hard_logits(model, image)
    values = hard_concept_values(model(image).concept_logits, SPECS)
    expected = model(image, concept_mask=torch.ones(3, 4, dtype=torch.bool), concept_values=values).logits
    torch.testing.assert_close(hard, expected)
    torch.testing.assert_close(soft, model(image).logits)


def test_head_rule_agreement() -> None:
    model = small_cbm()
    with torch.no_grad():  # class 1 iff spiky
        model.label_head.linear.weight.zero_()
        model.label_head.linear.weight[1, 2] = 10.0
        model.label_head.linear.bias.copy_(torch.tensor([0.0, -5.0]))
    concepts = torch.tensor([[5.0, 0.5, 1.0, 0.0], [5.0, 0.5, 0.0, 1.0], [5.0, NAN, 1.0, 1.0], [9.0, 0.1, 0.0, 0.0]])
    rule = torch.tensor([1, 0, 0, 1])
    agreement = head_rule_agreement(model, torch.randn(4, 1, 16, 16), concepts, rule)
    assert float(agreement) == pytest.approx(2 / 3)  # the NaN row is left out; the last row disagrees
