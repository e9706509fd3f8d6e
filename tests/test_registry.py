from __future__ import annotations

import pytest

from pellucid.models import UnknownModelError, create_model, list_models, register_model
from pellucid.models import registry as registry_module
from pellucid.models.blackbox import BlackBox


@pytest.fixture()
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def test_register_create_and_list(clean_registry: None) -> None:
    seen = {}

    @register_model
    def toy_model(spatial_dims: int, in_channels: int = 1, num_classes: int = 2, dropout: float = 0.25):
        seen.update(dropout=dropout)
        return BlackBox(spatial_dims, in_channels, num_classes, dropout=dropout)

    assert "toy_model" in list_models() and list_models("toy") == ["toy_model"]
    model = create_model("toy_model", 2, num_classes=4, dropout=None)  # None is dropped: builder default applies
    assert seen["dropout"] == 0.25
    assert model.model_spec.name == "toy_model"
    assert model.model_spec.kwargs == {"spatial_dims": 2, "num_classes": 4}
    assert model.num_classes == 4 and model.name == "toy_model"


def test_duplicate_and_bad_builders_are_refused(clean_registry: None) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model(registry_module._REGISTRY["blackbox"])

    def no_dims(in_channels: int):
        return None

    with pytest.raises(ValueError, match="first parameter must be 'spatial_dims'"):
        register_model(no_dims)


def test_unknown_model_lists_registered_ones() -> None:
    with pytest.raises(UnknownModelError, match=r"unknown model 'nope'; registered models: .*blackbox"):
        create_model("nope", 2)


def test_spatial_dims_is_validated() -> None:
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        create_model("blackbox", 4)
