from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from pellucid.models import ModelOptionError, create_backbone, create_model, validate_output
from pellucid.models.backbones import backbone_options, feature_shape

CASES = [
    ("monai/convnet", {}),
    ("monai/convnet", {"channels": (8, 16), "strides": (2, 1)}),
    ("monai/resnet10", {"widths": (8, 8, 16, 16)}),
    ("monai/resnet18", {"widths": (8, 8, 16, 16), "max_pool": True}),
]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_monai_backbones_report_channels_and_stride(name: str, kwargs: dict, spatial_dims: int) -> None:
    size = 64 if spatial_dims == 2 else 32
    backbone = create_backbone(name, spatial_dims, 2, **kwargs)
    channels, *spatial = feature_shape(backbone, [size] * spatial_dims)
    assert channels == backbone.out_channels
    assert spatial == [math.ceil(size / backbone.stride)] * spatial_dims


@pytest.mark.parametrize("in_channels", [1, 5])
def test_timm_backbone_any_channel_count(in_channels: int) -> None:
    backbone = create_backbone("timm/resnet10t", 2, in_channels)
    channels, height, width = feature_shape(backbone, [64, 64])
    assert (channels, backbone.stride) == (512, 32) and channels == backbone.out_channels
    assert (height, width) == (2, 2)


def test_timm_backbone_loads_a_local_weight_file(tmp_path) -> None:
    import timm

    torch.manual_seed(1)
    source = timm.create_model("resnet10t", in_chans=3)
    path = tmp_path / "resnet10t.safetensors"
    save_file(source.state_dict(), str(path))
    backbone = create_backbone("timm/resnet10t", 2, 1, weights_file=str(path))
    loaded = dict(backbone.model.named_parameters())
    torch.testing.assert_close(loaded["layer4.0.conv2.weight"], source.layer4[0].conv2.weight)
    # timm folds the RGB filters of the first convolution into the single input channel
    torch.testing.assert_close(loaded["conv1.0.weight"], source.conv1[0].weight.sum(dim=1, keepdim=True))
    fresh = create_backbone("timm/resnet10t", 2, 1)
    assert not torch.equal(dict(fresh.model.named_parameters())["layer4.0.conv2.weight"], source.layer4[0].conv2.weight)


def test_timm_backbone_errors_are_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="weights_file .*missing.safetensors.* does not exist"):
        create_backbone("timm/resnet10t", 2, 1, weights_file=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="2D only, got spatial_dims=3"):
        create_backbone("timm/resnet10t", 3, 1)
    with pytest.raises(ValueError, match="unknown backbone 'monai/vgg'; expected one of monai/convnet"):
        create_backbone("monai/vgg", 2, 1)


def test_blackbox_runs_on_a_timm_backbone() -> None:
    model = create_model("blackbox", 2, in_channels=3, num_classes=2, backbone="timm/resnet10t").eval()
    image = torch.randn(1, 3, 64, 64)
    validate_output(model(image), image, num_classes=2)


@pytest.mark.parametrize(("name", "options", "valid"), [
    ("monai/convnet", {"chanels": [8]}, {"act", "channels", "norm", "strides"}),
    ("monai/resnet18", {"depth": "resnet34"}, {"first_stride", "max_pool", "widths"}),  # the name fixes the depth
    ("timm/resnet10t", {"name": "resnet18"}, {"out_index", "weights_file"}),  # ... and the timm model
    ("monai/convnet", {"in_channels": 3}, {"act", "channels", "norm", "strides"}),  # the model gives it
])
def test_a_backbone_refuses_an_option_it_does_not_take_naming_the_valid_ones(name: str, options: dict,
                                                                              valid: set[str]) -> None:
    assert backbone_options(name) == valid
    key = next(iter(options))
    with pytest.raises(ModelOptionError, match=rf"^backbone '{name}': unknown option '{key}'; valid keys: "):
        create_backbone(name, 2, 1, **options)
