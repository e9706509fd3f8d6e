"""Generic tests over every registered model, in 2D and 3D (the contract every architecture shares)."""

from __future__ import annotations

import pytest
import torch
from synthetic import SIZES, make_batch

from pellucid.models import (
    InputError,
    check_parameter_groups,
    create_model,
    expected_parameters,
    list_models,
    validate_output,
)
from pellucid.models.registry import COUNT_CONFIGURATION

NUM_CLASSES = COUNT_CONFIGURATION["num_classes"]
IN_CHANNELS = COUNT_CONFIGURATION["in_channels"]

CASES = [(name, dims) for name in list_models() for dims in (2, 3)]
# Exact trainable-parameter counts, declared by each model at its @register_model (catches accidental architecture
# changes). A model that declares none for a spatial_dims is absent from COUNTED and tested for everything else;
# its parameter-group test says so in its id ("...-no_declared_count").
COUNTED = [(name, dims, expected_parameters(name)[dims]) for name, dims in CASES if dims in expected_parameters(name)]


def case_id(name: str, spatial_dims: int) -> str:
    """``<name>-<dims>d``, and ``-no_declared_count`` when the model declares no parameter count for it."""
    declared = spatial_dims in expected_parameters(name)
    return f"{name}-{spatial_dims}d" + ("" if declared else "-no_declared_count")


CASE_IDS = [case_id(name, dims) for name, dims in CASES]


def build(name: str, spatial_dims: int):
    torch.manual_seed(0)
    return create_model(name, spatial_dims, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)


@pytest.mark.parametrize(("name", "spatial_dims"), CASES, ids=CASE_IDS)
def test_output_contract_holds(name: str, spatial_dims: int) -> None:
    model = build(name, spatial_dims).eval()
    batch = make_batch(spatial_dims, batch_size=2)
    for explain in (True, False):
        output = model(batch["image"], explain=explain)
        validate_output(output, batch["image"], num_classes=NUM_CLASSES)
        assert output.logits is not None or output.segmentation is not None
    assert model(batch["image"], explain=True).localization is not None, "explained output must localize"


@pytest.mark.parametrize(("name", "spatial_dims"), CASES, ids=CASE_IDS)
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


@pytest.mark.parametrize(("name", "spatial_dims"), CASES, ids=CASE_IDS)
def test_parameter_groups_partition_the_parameters(name: str, spatial_dims: int) -> None:
    model = build(name, spatial_dims)
    groups = check_parameter_groups(model)
    assert sum(len(p) for p in groups.values()) == len(list(model.parameters()))


@pytest.mark.parametrize(("name", "spatial_dims", "expected"), COUNTED,
                         ids=[f"{name}-{dims}d" for name, dims, _ in COUNTED])
def test_declared_parameter_count_matches(name: str, spatial_dims: int, expected: int) -> None:
    count = sum(p.numel() for p in build(name, spatial_dims).parameters() if p.requires_grad)
    assert count == expected, (f"{name} {spatial_dims}D has {count} trainable parameters, its @register_model "
                               f"declares {expected}: update expected_parameters if the change is intended")


@pytest.mark.parametrize(("name", "spatial_dims"), CASES, ids=CASE_IDS)
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


@pytest.mark.parametrize(("name", "spatial_dims"), CASES, ids=CASE_IDS)
def test_odd_input_size_keeps_input_resolution(name: str, spatial_dims: int) -> None:
    model = build(name, spatial_dims).eval()
    odd = (37, 29) if spatial_dims == 2 else (19, 13, 17)
    image = torch.randn(1, 1, *odd)
    validate_output(model(image), image, num_classes=NUM_CLASSES)


@pytest.mark.parametrize(("name", "spatial_dims"), CASES, ids=CASE_IDS)
def test_forward_does_not_leave_hooks_or_change_mode(name: str, spatial_dims: int) -> None:
    model = build(name, spatial_dims).train()
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    with torch.inference_mode():
        model(make_batch(spatial_dims)["image"], explain=True)
    assert model.training
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == hooks_before
