"""Feature extractors behind one small interface: channels and stride of the feature map they return.

Backbones are named by a prefixed string so configs stay plain text:

- ``"monai/convnet"``: a stack of MONAI residual units (2D and 3D), small and fast on CPU.
- ``"monai/resnet10"``, ``"monai/resnet18"``, ``"monai/resnet34"``: MONAI's ResNet (2D and 3D) without its head.
- ``"bcos/resnet"``: the dynamic-linear B-cos ResNet of :mod:`pellucid.models.bcos` (2D and 3D).
- ``"timm/<name>"``: any timm model as a ``features_only`` extractor (2D only), with any number of input
  channels and optionally a local weight file loaded through timm's own ``pretrained_cfg`` ``file`` mechanism.
  Nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod
from pathlib import Path

import torch
from monai.networks.blocks import ResidualUnit
from monai.networks.nets import ResNet
from torch import Tensor, nn

from pellucid.models.options import ModelOptionError, keyword_options

MONAI_RESNET_LAYERS = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


class Backbone(nn.Module):
    """A feature extractor returning one (B, out_channels, *s) map with ``s = ceil(S / stride)`` (about).

    Attributes:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Channels of the returned feature map.
        stride: Downsampling factor from input to feature map along each spatial axis.
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    stride: int


class MonaiConvNet(Backbone):
    """A plain encoder of MONAI ``ResidualUnit``s, one per stage, each stage downsampling by its stride.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        channels: Output channels of each stage.
        strides: Stride of each stage (same length as ``channels``).
        norm: MONAI norm name (``"batch"``, ``"instance"``, ...).
        act: MONAI activation name.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int] = (16, 32, 64),
        strides: Sequence[int] = (2, 2, 2),
        norm: str = "batch",
        act: str = "relu",
    ) -> None:
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"monai/convnet: channels and strides must have the same non-zero length, "
                             f"got channels={list(channels)} strides={list(strides)}")
        stages, previous = [], in_channels
        for width, step in zip(channels, strides, strict=True):
            stages.append(ResidualUnit(spatial_dims, previous, width, strides=step, subunits=2, norm=norm, act=act))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.out_channels, self.stride = previous, prod(strides)

    def forward(self, x: Tensor) -> Tensor:
        """Return the last stage's feature map."""
        return self.stages(x)


class MonaiResNet(Backbone):
    """MONAI's ResNet (basic blocks) up to its last stage, for 2D and 3D.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        depth: ``"resnet10"``, ``"resnet18"`` or ``"resnet34"``.
        widths: Channels of the four stages (MONAI's default is 64, 128, 256, 512).
        first_stride: Stride of the first convolution.
        max_pool: Whether to keep the max-pool after the first convolution (another stride 2).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        depth: str = "resnet10",
        widths: Sequence[int] = (32, 64, 128, 256),
        first_stride: int = 2,
        max_pool: bool = False,
    ) -> None:
        super().__init__()
        if depth not in MONAI_RESNET_LAYERS:
            raise ValueError(f"monai resnet depth must be one of {sorted(MONAI_RESNET_LAYERS)}, got {depth!r}")
        if len(widths) != 4:
            raise ValueError(f"monai/{depth}: widths must have 4 entries, got {list(widths)}")
        net = ResNet(
            "basic", list(MONAI_RESNET_LAYERS[depth]), list(widths), spatial_dims=spatial_dims,
            n_input_channels=in_channels, conv1_t_stride=first_stride, no_max_pool=not max_pool, feed_forward=False,
        )
        stem = [net.conv1, net.bn1, net.act] + ([net.maxpool] if max_pool else [])
        self.stem = nn.Sequential(*stem)
        self.stages = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.out_channels = widths[-1]
        self.stride = first_stride * (2 if max_pool else 1) * 8  # layers 2-4 each halve the size

    def forward(self, x: Tensor) -> Tensor:
        """Return the fourth stage's feature map."""
        return self.stages(self.stem(x))


class TimmBackbone(Backbone):
    """A timm model as a ``features_only`` extractor (2D).

    Args:
        spatial_dims: Must be 2 (timm models are 2D).
        in_channels: Input channels; timm adapts the first convolution (and pretrained weights) to it.
        name: timm model name, e.g. ``"resnet18"``.
        out_index: Which feature level to return (``-1`` = deepest).
        weights_file: Optional local file (``.safetensors``, ``.pth``) with the full model's weights, loaded by
            timm's ``pretrained_cfg`` ``file`` mechanism. Never downloads.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        name: str = "resnet18",
        out_index: int = -1,
        weights_file: str | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"timm/{name}: timm backbones are 2D only, got spatial_dims={spatial_dims}; "
                             "use a monai/ backbone for 3D")
        import timm  # local import: timm is slow to import and only 2D models need it

        overlay = None
        if weights_file is not None:
            path = Path(weights_file)
            if not path.is_file():
                raise FileNotFoundError(f"timm/{name}: weights_file {str(path)!r} does not exist")
            overlay = {"file": str(path), "source": "timm"}  # 'file' wins over any hub or URL entry
        self.model = timm.create_model(
            name, features_only=True, out_indices=(out_index,), in_chans=in_channels,
            pretrained=weights_file is not None, pretrained_cfg_overlay=overlay,
        )
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.out_channels = int(self.model.feature_info.channels()[-1])
        self.stride = int(self.model.feature_info.reduction()[-1])

    def forward(self, x: Tensor) -> Tensor:
        """Return the selected feature level."""
        return self.model(x)[-1]


def backbone_class(name: str) -> tuple[type[Backbone], dict[str, str]]:
    """The class a backbone name dispatches to, and the keyword arguments its name fixes (``timm/x``: ``name="x"``).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name.startswith("timm/"):
        return TimmBackbone, {"name": name.removeprefix("timm/")}
    if name == "monai/convnet":
        return MonaiConvNet, {}
    if name.startswith("monai/") and name.removeprefix("monai/") in MONAI_RESNET_LAYERS:
        return MonaiResNet, {"depth": name.removeprefix("monai/")}
    if name == "bcos/resnet":
        from pellucid.models.bcos import BcosResNet  # bcos imports this module

        return BcosResNet, {}
    known = ["monai/convnet", *(f"monai/{d}" for d in MONAI_RESNET_LAYERS), "bcos/resnet", "timm/<any timm model>"]
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(known)}")


def backbone_options(name: str) -> frozenset[str]:
    """The options (``backbone_kwargs`` keys) the backbone ``name`` takes.

    ``spatial_dims`` and ``in_channels`` come from the model, and what the name fixes (a timm model's ``name``, a
    MONAI ResNet's ``depth``) from the name. For ``timm/<name>`` these are :class:`TimmBackbone`'s options, which is
    exact: no other option reaches timm.
    """
    backbone, fixed = backbone_class(name)
    names, _ = keyword_options(backbone.__init__, skip={"spatial_dims", "in_channels", *fixed})
    return names


def check_backbone_options(name: str, options: Mapping[str, object]) -> None:
    """Refuse an option the backbone ``name`` does not take (see :func:`backbone_options`).

    Raises:
        ModelOptionError: naming the backbone, the key and the valid keys.
        ValueError: for an unknown backbone name.
    """
    valid = backbone_options(name)
    for key in options:
        if key not in valid:
            raise ModelOptionError(None, (key,), valid, owner=f"backbone {name!r}")


def create_backbone(name: str, spatial_dims: int, in_channels: int, /, **kwargs: object) -> Backbone:
    """Build a backbone from its prefixed name (see the module docstring), after checking its options.

    The first three arguments are positional-only, so that an option named like one of them (``in_channels``) is
    refused by the check rather than clashing with it.

    Raises:
        ValueError: for an unknown name, listing the known ones.
        ModelOptionError: for an option the backbone does not take, naming it and the valid ones.
    """
    backbone, fixed = backbone_class(name)
    check_backbone_options(name, kwargs)
    return backbone(spatial_dims, in_channels, **fixed, **kwargs)


@torch.no_grad()
def feature_shape(backbone: Backbone, spatial_size: Sequence[int]) -> tuple[int, ...]:
    """Return the (C, *s) shape the backbone produces for one input of ``spatial_size`` (a dry run)."""
    was_training = backbone.training
    backbone.eval()
    try:
        probe = torch.zeros(1, backbone.in_channels, *spatial_size, device=next(backbone.parameters()).device)
        return tuple(backbone(probe).shape[1:])
    finally:
        backbone.train(was_training)
