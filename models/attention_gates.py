"""Blocks shared by the attention-gated networks: the grid attention gate and a multi-scale residual encoder.

The gate is the additive grid attention of Oktay et al., "Attention U-Net: Learning Where to Look for the
Pancreas" (MIDL 2018, https://arxiv.org/abs/1804.03999) and Schlemper et al., "Attention gated networks: Learning
to leverage salient regions in medical images" (MedIA 2019, https://arxiv.org/abs/1808.08114)::

    alpha = sigmoid(psi(relu(theta(x) + resize(phi(g)))))      # at x's resolution / subsample
    gated = x * resize(alpha)                                  # at x's resolution

Unlike MONAI's ``AttentionBlock`` (which needs ``g`` at ``x``'s resolution and returns only ``gated``), this gate
takes a coarser gating signal, works at any input size, and returns its coefficients ``alpha`` as an output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import Tensor, nn


def resize_to(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Resize (B, C, *s) maps to spatial ``size`` by (bi/tri)linear interpolation; unchanged if already that size."""
    size = tuple(int(n) for n in size)
    if tuple(maps.shape[2:]) == size:
        return maps
    mode = "bilinear" if maps.ndim == 4 else "trilinear"
    return F.interpolate(maps, size=size, mode=mode, align_corners=False)


def gate_sparsity_loss(model_name: str, attention: Sequence[Tensor] | None) -> Tensor:
    """Mean gate coefficient over every gate map: small when the gates open only where they need to.

    Raises:
        ValueError: naming the model when the output carries no gate maps.
    """
    if not attention:
        raise ValueError(f"{model_name}: gate_sparsity needs the gate maps in output.attention")
    return torch.stack([gate.mean() for gate in attention]).mean()


def crop_to(features: Tensor, size: Sequence[int]) -> Tensor:
    """Crop (B, C, *s) features to the leading ``size`` voxels per axis (undoes the padding of ceil-sized strides)."""
    slices = tuple(slice(0, int(n)) for n in size)
    return features[(slice(None), slice(None), *slices)]


class GatedFeatures(NamedTuple):
    """What a gate returns.

    Attributes:
        features: (B, C, *s) the input features multiplied by the coefficients.
        coefficients: (B, 1, *s) the gate's attention coefficients in [0, 1], at the features' resolution.
    """

    features: Tensor
    coefficients: Tensor


class GridAttentionGate(nn.Module):
    """Additive grid attention gate: a gating signal ``g`` decides which locations of ``x`` pass.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Channels of the gated features ``x``.
        gating_channels: Channels of the gating signal ``g`` (any resolution; resized to ``x``'s grid).
        inter_channels: Channels of the joint embedding; ``None`` = ``max(1, in_channels // 2)`` (as MONAI).
        subsample: Stride (and kernel) of ``theta`` on ``x``: 1 computes coefficients at ``x``'s resolution,
            2 at half of it (Oktay et al.), resized back to ``x``'s resolution before gating.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        gating_channels: int,
        inter_channels: int | None = None,
        subsample: int = 1,
    ) -> None:
        super().__init__()
        if subsample < 1:
            raise ValueError(f"GridAttentionGate: subsample must be >= 1, got {subsample!r}")
        inter = inter_channels if inter_channels is not None else max(1, in_channels // 2)
        if inter < 1:
            raise ValueError(f"GridAttentionGate: inter_channels must be >= 1, got {inter_channels!r}")
        self.theta = Convolution(spatial_dims, in_channels, inter, strides=subsample, kernel_size=subsample,
                                 padding=0, bias=False, conv_only=True)
        self.phi = Convolution(spatial_dims, gating_channels, inter, kernel_size=1, padding=0, conv_only=True)
        self.psi = Convolution(spatial_dims, inter, 1, kernel_size=1, padding=0, conv_only=True)

    def forward(self, x: Tensor, g: Tensor) -> GatedFeatures:
        """Gate ``x`` (B, C, *s) with ``g`` (B, G, *s_g); return gated features and coefficients (B, 1, *s)."""
        coefficients = self.coefficients(x, g)
        return GatedFeatures(x * coefficients, coefficients)

    def coefficients(self, x: Tensor, g: Tensor) -> Tensor:
        """Only the (B, 1, *s) coefficients, for a caller that pools ``x`` with them instead of gating it."""
        theta_x = self.theta(x)
        phi_g = resize_to(self.phi(g), theta_x.shape[2:])
        return resize_to(self.psi(F.relu(theta_x + phi_g)).sigmoid(), x.shape[2:])


BLOCKS = ("residual", "plain")


def conv_block(spatial_dims: int, in_channels: int, out_channels: int, stride: int, norm: str, act: str,
               block: str = "residual", convolutions: int = 2) -> nn.Module:
    """One encoder stage or decoder merge: ``convolutions`` 3-wide convolutions, the first with ``stride``.

    ``residual``: MONAI's ``ResidualUnit`` (the convolutions plus a projection of the input, a strided 3-wide
    convolution when the stage strides). ``plain``: the convolutions alone, each followed by ``norm`` and ``act``,
    as the ``ConvBlock`` (two) and the merge (one) of MONAI's ``AttentionUnet``.

    Raises:
        ValueError: for a ``block`` not in :data:`BLOCKS`.
    """
    if block == "residual":
        return ResidualUnit(spatial_dims, in_channels, out_channels, strides=stride, subunits=convolutions,
                            norm=norm, act=act)
    if block == "plain":
        widths = [in_channels] + [out_channels] * convolutions
        return nn.Sequential(*(Convolution(spatial_dims, widths[i], widths[i + 1], strides=stride if i == 0 else 1,
                                           norm=norm, act=act, adn_ordering="NDA") for i in range(convolutions)))
    raise ValueError(f"block: expected one of {list(BLOCKS)}, got {block!r}")


class ResidualEncoder(nn.Module):
    """A stack of convolution stages (MONAI ``ResidualUnit``s by default) giving every stage's features, finest first.

    Stage ``i`` maps ``channels[i - 1]`` (``in_channels`` for the first) to ``channels[i]`` with stride
    ``strides[i]``; a stage of stride ``s`` maps size ``n`` to ``ceil(n / s)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        channels: Output channels of each stage.
        strides: Stride of each stage.
        norm: MONAI norm name.
        act: MONAI activation name.
        block: ``residual`` or ``plain`` (see :func:`conv_block`).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        strides: Sequence[int],
        norm: str = "batch",
        act: str = "relu",
        block: str = "residual",
    ) -> None:
        super().__init__()
        if not channels or len(channels) != len(strides):
            raise ValueError(f"ResidualEncoder: channels and strides must have the same non-zero length, "
                             f"got channels={list(channels)} strides={list(strides)}")
        stages, previous = [], in_channels
        for width, step in zip(channels, strides, strict=True):
            stages.append(conv_block(spatial_dims, previous, width, step, norm, act, block))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.channels = tuple(channels)
        self.strides = tuple(strides)

    @property
    def stride(self) -> int:
        """Stride of the last (coarsest) stage's features relative to the input, as the backbones report it."""
        return math.prod(self.strides)

    def forward(self, image: Tensor) -> list[Tensor]:
        """(B, C, *S) image -> one (B, channels[i], *s_i) feature map per stage, finest first."""
        features, current = [], image
        for stage in self.stages:
            current = stage(current)
            features.append(current)
        return features
