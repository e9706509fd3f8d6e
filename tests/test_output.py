from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from pellucid.models import ModelOutput, OutputContractError, validate_output
from pellucid.models.output import TENSOR_FIELDS

IMAGE = torch.zeros(2, 1, 8, 8)


def good() -> ModelOutput:
    return ModelOutput(
        logits=torch.zeros(2, 3),
        localization=torch.rand(2, 3, 8, 8),
        prototype_similarity=torch.rand(2, 6),
        prototype_maps=torch.rand(2, 6, 2, 2),
        concept_logits=torch.zeros(2, 4),
        concept_maps=torch.rand(2, 4, 2, 2),
        attention=(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 2, 2)),
        segmentation=torch.zeros(2, 2, 8, 8),
    )


def test_valid_output_passes_and_lists_fields() -> None:
    output = good()
    validate_output(output, IMAGE, num_classes=3, num_prototypes=6, num_concepts=4)
    assert "ids" not in output.present() and len(output.present()) == 8
    assert [name for name, _ in output.tensors()][-2:] == ["attention.0", "attention.1"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"logits": torch.zeros(3, 3)}, r"logits: expected batch size 2"),
        ({"logits": torch.zeros(2, 4)}, r"logits: expected K = 3"),
        ({"localization": torch.rand(2, 3, 4, 4)}, r"localization: expected spatial size \(8, 8\)"),
        ({"localization": torch.rand(2, 3, 8, 8) + 1.5}, r"localization: expected values in \[0, 1\]"),
        ({"localization": torch.rand(2, 2, 8, 8)}, r"localization: expected K = 3 \(or 1, class-agnostic\)"),
        ({"segmentation": torch.zeros(2, 2, 8, 7)}, r"segmentation: expected spatial size"),
        ({"prototype_maps": torch.rand(2, 5, 2, 2)}, r"prototype_maps: expected P = 6"),
        ({"concept_maps": torch.rand(2, 4, 2)}, r"concept_maps: expected 4 axes"),
        ({"attention": (torch.rand(2, 2, 4, 4),)}, r"attention.0: expected channels = 1"),
        ({"attention": ()}, r"attention: expected a non-empty tuple"),
        ({"logits": torch.tensor([[0.0, float("nan"), 0.0]] * 2)}, r"logits: expected finite values, got 2 NaN"),
        ({"aux": {"distances": torch.zeros(3, 6)}}, r"aux\['distances'\]: expected batch size 2 .* shape \(3, 6\)"),
        ({"aux": {"distances": torch.tensor(1.0)}}, r"aux\['distances'\]: expected batch size 2 .* shape \(\)"),
        ({"aux": {"distances": [1.0, 2.0]}}, r"aux\['distances'\]: expected a torch.Tensor, got list"),
        ({"aux": (torch.zeros(2),)}, r"aux: expected a dict of str -> \(B, ...\) tensors, got tuple"),
    ],
)
def test_contract_violations_name_field_expected_and_actual(change: dict, message: str) -> None:
    output = good()
    for key, value in change.items():
        setattr(output, key, value)
    with pytest.raises(OutputContractError, match=message):
        validate_output(output, IMAGE, num_classes=3, num_prototypes=6, num_concepts=4)


def test_class_agnostic_localization_has_one_channel() -> None:
    output = good()
    output.localization = torch.rand(2, 1, 8, 8)
    validate_output(output, IMAGE, num_classes=3)


def test_empty_output_and_wrong_ids_are_rejected() -> None:
    with pytest.raises(OutputContractError, match="every field is None"):
        validate_output(ModelOutput(), IMAGE)
    output = good()
    output.ids = ["a"]
    with pytest.raises(OutputContractError, match="ids: expected 2 ids, got 1"):
        validate_output(output, IMAGE)


def test_detach_and_cpu_copy_every_tensor() -> None:
    weight = torch.ones(1, requires_grad=True)
    output = ModelOutput(logits=torch.zeros(2, 3) * weight, attention=(torch.ones(2, 1, 2, 2) * weight,),
                         ids=["a", "b"])
    detached = output.detach()
    assert output.logits.requires_grad and not detached.logits.requires_grad
    assert not detached.attention[0].requires_grad and detached.ids == ["a", "b"]
    assert detached.cpu().logits.device.type == "cpu"


def test_tensor_fields_are_every_single_tensor_field_of_the_dataclass() -> None:
    assert TENSOR_FIELDS == ("logits", "segmentation", "localization", "prototype_similarity", "prototype_maps",
                             "concept_logits", "concept_maps")
    assert {f.name for f in fields(ModelOutput)} - set(TENSOR_FIELDS) == {"attention", "aux", "ids"}


def test_aux_is_validated_mapped_by_apply_and_kept_out_of_the_contract_listings() -> None:
    weight = torch.ones(1, requires_grad=True)
    output = good()
    output.aux = {"prototype_distances": torch.rand(2, 6) * weight, "maps": torch.rand(2, 6, 2, 2)}
    validate_output(output, IMAGE, num_classes=3, num_prototypes=6, num_concepts=4)
    assert "aux" not in output.present() and not any(name.startswith("aux") for name, _ in output.tensors())
    detached = output.detach()
    assert output.aux["prototype_distances"].requires_grad
    assert not detached.aux["prototype_distances"].requires_grad and set(detached.aux) == set(output.aux)
    assert detached.aux is not output.aux  # a copy: editing one output's mapping leaves the other alone
    sliced = output.apply(lambda t: t[:1])
    assert sliced.aux["maps"].shape == (1, 6, 2, 2) and sliced.logits.shape == (1, 3)


def test_outputs_do_not_share_a_default_aux_mapping_and_aux_alone_is_empty() -> None:
    first, second = ModelOutput(), ModelOutput()
    first.aux["x"] = torch.zeros(1)
    assert second.aux == {}
    with pytest.raises(OutputContractError, match="every field is None"):
        validate_output(ModelOutput(aux={"x": torch.zeros(2)}), IMAGE)
