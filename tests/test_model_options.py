"""Checked model options: a misspelled key, at any depth, is one error naming the model, key path and valid keys."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from torch import nn

import pellucid.models.backbones as backbones_module
import pellucid.models.protopnet as protopnet_module
from pellucid.models import ModelOptionError, create_model
from pellucid.models.blackbox import BlackBox
from pellucid.models.options import builder_options, check_model_options
from pellucid.training.module import InterpretableModule

CONVNET_KEYS = "act, channels, norm, strides"


def fail_if_called(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("built although an option was misspelled")


def test_a_misspelled_top_level_option_names_the_model_the_key_and_the_valid_keys(monkeypatch) -> None:
    monkeypatch.setattr(protopnet_module, "_create_protopnet", fail_if_called)  # nothing is built
    with pytest.raises(ModelOptionError) as error:
        create_model("protopnet", 2, in_channels=1, num_classes=3, prototypes_per_clas=3)
    message = str(error.value)
    assert message.startswith("model 'protopnet': unknown option 'prototypes_per_clas'; valid keys: ")
    assert "backbone_kwargs, concept_guidance" in message and "did you mean 'prototypes_per_class'?" in message
    # the builder takes **kwargs: the valid keys are ProtoPNet.__init__'s, which the builder forwards them to
    assert "mask_guidance_temperature" in error.value.valid and "spatial_dims" not in error.value.valid
    assert isinstance(error.value, ValueError) and error.value.path == ("prototypes_per_clas",)


def test_a_misspelled_backbone_option_names_the_full_key_path_and_the_backbones_keys(monkeypatch) -> None:
    monkeypatch.setattr(backbones_module, "ResidualUnit", fail_if_called)  # the backbone is not built
    with pytest.raises(ModelOptionError) as error:
        create_model("protopnet", 2, in_channels=1, num_classes=3, backbone_kwargs={"chanels": [8]})
    assert str(error.value) == (
        "model 'protopnet': unknown option 'backbone_kwargs.chanels'; valid keys of backbone_kwargs "
        f"(backbone 'monai/convnet'): {CONVNET_KEYS}; did you mean 'backbone_kwargs.channels'?")
    assert (error.value.model, error.value.key_path) == ("protopnet", "backbone_kwargs.chanels")


def test_a_named_backbone_is_checked_before_the_builder_runs(monkeypatch) -> None:
    monkeypatch.setattr(protopnet_module, "_create_protopnet", fail_if_called)
    with pytest.raises(ModelOptionError, match=r"'backbone_kwargs\.chanels'.*\(backbone 'monai/convnet'\)"):
        create_model("protopnet", 2, num_classes=3, backbone="monai/convnet", backbone_kwargs={"chanels": [8]})
    with pytest.raises(ModelOptionError, match=r"\(backbone 'timm/resnet10t'\): out_index, weights_file; did you"):
        create_model("protopnet", 2, num_classes=3, backbone="timm/resnet10t", backbone_kwargs={"out_indx": 1})
    with pytest.raises(ValueError, match="unknown backbone 'monai/vgg'"):
        create_model("protopnet", 2, num_classes=3, backbone="monai/vgg", backbone_kwargs={"channels": [8]})


def test_the_backbone_a_builder_picks_checks_its_own_keys() -> None:
    """``blackbox_resnet10`` picks ``monai/resnet10`` in its body: a convnet key is refused, a ResNet key builds."""
    with pytest.raises(ModelOptionError) as error:
        create_model("blackbox_resnet10", 2, num_classes=3, backbone_kwargs={"channels": [8, 16]})
    assert str(error.value) == ("model 'blackbox_resnet10': unknown option 'backbone_kwargs.channels'; valid keys of "
                                "backbone_kwargs (backbone 'monai/resnet10'): first_stride, max_pool, widths")
    model = create_model("blackbox_resnet10", 2, num_classes=3, backbone_kwargs={"widths": [8, 8, 16, 16]})
    assert model.backbone.out_channels == 16


def test_the_training_module_raises_the_same_error() -> None:
    with pytest.raises(ModelOptionError, match=r"model 'protopnet': unknown option 'backbone_kwargs\.chanels'"):
        InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3,
                            model_kwargs={"backbone_kwargs": {"chanels": [8]}})


def test_the_check_follows_kwargs_to_a_leaf_class_and_stops_where_it_cannot_see() -> None:
    def forwarding(spatial_dims: int, pooling: str = "avg", **kwargs: Any) -> BlackBox:
        return BlackBox(spatial_dims, pooling=pooling, **kwargs)

    def opaque(spatial_dims: int, **kwargs: Any) -> nn.Module:  # may build any module: nothing to follow
        return BlackBox(spatial_dims, **kwargs)

    names, is_open = builder_options(forwarding)
    assert not is_open and {"pooling", "dropout", "backbone_kwargs"} <= names and "spatial_dims" not in names
    with pytest.raises(ModelOptionError, match="model 'forwarding': unknown option 'drop_out'"):
        check_model_options("forwarding", forwarding, {"drop_out": 0.1})
    assert builder_options(opaque)[1]
    check_model_options("opaque", opaque, {"anything": 1})  # accepted: the check stops at an open signature


def test_the_error_survives_pickling_for_worker_processes() -> None:
    error = ModelOptionError("protopnet", ("backbone_kwargs", "chanels"), ["channels", "strides"], "backbone 'x'")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.path, copy.valid) == (str(error), error.path, error.valid)
