"""Generic tests over every registered model, in 2D and 3D (the contract every architecture shares)."""

from __future__ import annotations

import pytest
import torch
from synthetic import SIZES, make_batch

from pellucid.models import InputError, check_parameter_groups, create_model, list_models, validate_output

NUM_CLASSES = 3

# Exact trainable-parameter counts (in_channels=1, num_classes=3): catches accidental architecture changes.
# A new model must be added here.
PARAMETER_COUNTS = {
    ("blackbox", 2): 95_731,
    ("blackbox", 3): 285_235,
    ("blackbox_resnet10", 2): 1_228_323,
    ("blackbox_resnet10", 3): 3_597_027,
    # prototype family
    ("protopnet", 2): 105_866,
    ("protopnet", 3): 295_370,
    ("protopnet_cosine", 2): 105_866,
    ("protopnet_cosine", 3): 295_370,
    ("xprotonet", 2): 111_976,
    ("xprotonet", 3): 301_480,
    # concept family
    ("cbm", 2): 95_675,
    ("cbm", 3): 285_179,
    ("cbm_spatial", 2): 95_805,
    ("cbm_spatial", 3): 285_309,
    ("cem", 2): 99_861,
    ("cem", 3): 289_365,
    # attention family
    ("attention_classifier", 2): 97_909,
    ("attention_classifier", 3): 287_413,
    ("attention_unet", 2): 145_301,
    ("attention_unet", 3): 414_165,
}

CASES = [(name, dims) for name in list_models() for dims in (2, 3)]


def build(name: str, spatial_dims: int):
    torch.manual_seed(0)
    return create_model(name, spatial_dims, in_channels=1, num_classes=NUM_CLASSES)


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_output_contract_holds(name: str, spatial_dims: int) -> None:
    model = build(name, spatial_dims).eval()
    batch = make_batch(spatial_dims, batch_size=2)
    for explain in (True, False):
        output = model(batch["image"], explain=explain)
        validate_output(output, batch["image"], num_classes=NUM_CLASSES)
        assert output.logits is not None or output.segmentation is not None
    assert model(batch["image"], explain=True).localization is not None, "explained output must localize"


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_backward_reaches_every_trainable_parameter(name: str, spatial_dims: int) -> None:
    model = build(name, spatial_dims).train()
    batch = make_batch(spatial_dims, batch_size=2, concepts=getattr(model, "concept_specs", None))
    output = model(batch["image"], explain=False)
    terms = model.loss_terms(output, batch)
    assert terms and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    unreached = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unreached == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_parameter_groups_partition_and_counts(name: str, spatial_dims: int) -> None:
    model = build(name, spatial_dims)
    groups = check_parameter_groups(model)
    assert sum(len(p) for p in groups.values()) == len(list(model.parameters()))
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (name, spatial_dims) in PARAMETER_COUNTS, f"pin the parameter count of {name} {spatial_dims}D: {count}"
    assert count == PARAMETER_COUNTS[(name, spatial_dims)]


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_bad_input_names_expected_and_actual(name: str, spatial_dims: int) -> None:
    model = build(name, spatial_dims).eval()
    size = SIZES[spatial_dims]
    with pytest.raises(InputError, match=r"expected 1 input channel.*got 3"):
        model(torch.randn(1, 3, *size))
    wrong_dims = (16, 16) if spatial_dims == 3 else (8, 16, 16)
    pattern = rf"spatial_dims={spatial_dims}.*expected a {spatial_dims + 2}-D image.*got shape"
    with pytest.raises(InputError, match=pattern):
        model(torch.randn(1, 1, *wrong_dims))
    image = torch.randn(1, 1, *size)
    image.view(-1)[3] = float("nan")
    with pytest.raises(InputError, match=r"expected finite pixel values, got 1 NaN"):
        model(image)


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_odd_input_size_keeps_input_resolution(name: str, spatial_dims: int) -> None:
    model = build(name, spatial_dims).eval()
    odd = (37, 29) if spatial_dims == 2 else (19, 13, 17)
    image = torch.randn(1, 1, *odd)
    validate_output(model(image), image, num_classes=NUM_CLASSES)


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_forward_does_not_leave_hooks_or_change_mode(name: str, spatial_dims: int) -> None:
    model = build(name, spatial_dims).train()
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    with torch.inference_mode():
        model(make_batch(spatial_dims)["image"], explain=True)
    assert model.training
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == hooks_before
