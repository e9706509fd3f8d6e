"""Attention U-Net segmenter whose attention gates are outputs, not internals.

Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018,
https://arxiv.org/abs/1804.03999. Built from MONAI blocks (``ResidualUnit``, ``UpSample``, ``Convolution``) with
the grid attention gate of :mod:`pellucid.models.attention_gates`. MONAI's own ``AttentionUnet`` multiplies the gate
coefficients into the skip connections and throws them away; this one returns every gate's coefficients in
``ModelOutput.attention`` and combines them into a class-agnostic ``localization`` map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.losses import DiceCELoss
from monai.networks.blocks import Convolution, UpSample
from torch import Tensor, nn

from pellucid.models.attention_gates import (
    GridAttentionGate,
    ResidualEncoder,
    conv_block,
    crop_to,
    gate_sparsity_loss,
    resize_to,
)
from pellucid.models.base import InterpretableModel
from pellucid.models.maps import resize_maps
from pellucid.models.output import ModelOutput
from pellucid.models.registry import register_model


class DecoderLevel(nn.Module):
    """One decoder step: upsample the coarser features, gate the skip connection with them, merge.

    Args:
        spatial_dims: 2 or 3.
        coarse_channels: Channels of the coarser decoder (or bottleneck) features.
        skip_channels: Channels of the encoder skip connection (and of this level's output).
        stride: Size ratio between the skip and the coarser features.
        gate_subsample: Subsampling of the gate's ``theta`` (see :class:`GridAttentionGate`).
        norm: MONAI norm name.
        act: MONAI activation name.
        block: The merge's ``residual`` unit (two convolutions and a projection) or ``plain`` single convolution.
    """

    def __init__(self, spatial_dims: int, coarse_channels: int, skip_channels: int, stride: int, gate_subsample: int,
                 norm: str, act: str, block: str = "residual") -> None:
        super().__init__()
        self.gate = GridAttentionGate(spatial_dims, skip_channels, coarse_channels, subsample=gate_subsample)
        self.upsample = UpSample(spatial_dims, coarse_channels, skip_channels, scale_factor=stride, mode="deconv")
        # MONAI's AttentionUnet merges with one convolution; the residual unit keeps two
        self.merge = conv_block(spatial_dims, 2 * skip_channels, skip_channels, 1, norm, act, block,
                                convolutions=1 if block == "plain" else 2)

    def forward(self, coarse: Tensor, skip: Tensor) -> tuple[Tensor, Tensor]:
        """Return this level's features (B, skip_channels, *s) and the gate's coefficients (B, 1, *s)."""
        gated, coefficients = self.gate(skip, coarse)
        # a stride-s stage maps n to ceil(n / s); the transposed convolution gives s * ceil(n / s) >= n
        upsampled = crop_to(self.upsample(coarse), skip.shape[2:])
        return self.merge(torch.cat([gated, upsampled], dim=1)), coefficients


class AttentionUNet(InterpretableModel):
    """U-Net with a grid attention gate on every skip connection, gated by the coarser decoder features.

    Outputs: ``segmentation`` (B, num_classes, *S) logits; ``attention``: one (B, 1, *s_l) coefficient map per
    gate, ordered coarse to fine (the deepest skip connection first, the finest one last), each at its
    skip connection's resolution; ``localization`` (B, 1, *S): the gate maps resized to the input size
    (bi/trilinear) and averaged, so a location scores 1 only when every gate lets it through; ``logits`` is None.

    Loss terms (MONAI ``DiceCELoss``, split so each is logged and weighted): ``dice`` (soft Dice of the foreground
    classes pooled over the batch, so scans without lesion do not divide by zero) and ``cross_entropy``, both
    against ``batch["mask"]`` as class indices. With ``gate_sparsity``, also ``gate_sparsity``: the mean gate
    coefficient. Without it nothing asks a gate to close (the decoder can use every skip connection in full), and
    the gates stay open almost everywhere; a small weight on this term (``loss_weights``) makes them open only
    where the skip connection's detail is worth its cost.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Segmentation classes, background included.
        channels: Channels of each resolution level, finest first (at least two levels).
        strides: Stride of each level relative to the previous one (``len(channels)`` entries); ``strides[0]`` is
            the finest level's stride relative to the input: 1 is the classic full-resolution U-Net, 2 keeps the
            costly full-resolution convolutions out (the logits are then resized to the input size, bilinearly).
        gate_subsample: Subsampling of each gate's ``theta``: 1 (default) computes coefficients at the skip
            connection's own resolution, which localized lesions better on the phantom benchmark; 2 at the coarser
            level's grid, as in Oktay et al.
        gate_sparsity: Add the ``gate_sparsity`` loss term (unweighted; weigh it with the module's ``loss_weights``).
        norm: MONAI norm name.
        act: MONAI activation name.
        blocks: ``residual`` (default): every encoder stage and decoder merge a MONAI ``ResidualUnit`` (two
            convolutions and a projection); ``plain``: MONAI ``AttentionUnet``'s blocks (two convolutions per encoder
            stage, one per merge), about 0.72x the multiply-adds at the same channels.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64),
        strides: Sequence[int] = (2, 2, 2),
        gate_subsample: int = 1,
        gate_sparsity: bool = False,
        norm: str = "batch",
        act: str = "relu",
        blocks: str = "residual",
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_classes)
        if num_classes < 2:
            raise ValueError(f"attention_unet: num_classes counts the background and must be >= 2, got {num_classes}")
        if len(channels) < 2 or len(strides) != len(channels):
            raise ValueError(f"attention_unet: need >= 2 levels and one stride per level, "
                             f"got channels={list(channels)} strides={list(strides)}")
        self.encoder = ResidualEncoder(spatial_dims, in_channels, channels, strides, norm=norm, act=act, block=blocks)
        # decoder levels run coarse to fine: levels[0] joins the bottleneck with the deepest skip connection
        self.decoder = nn.ModuleList(
            DecoderLevel(spatial_dims, channels[i + 1], channels[i], strides[i + 1], gate_subsample, norm, act, blocks)
            for i in reversed(range(len(channels) - 1))
        )
        self.output_conv = Convolution(spatial_dims, channels[0], num_classes, kernel_size=1, padding=0,
                                       conv_only=True)
        self.gate_sparsity = gate_sparsity
        self.loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:
        """Segment; ``explain`` adds the combined ``localization`` map (the gate maps are always returned)."""
        self.check_input(image)
        *skips, current = self.encoder(image)
        gates = []
        for level, skip in zip(self.decoder, reversed(skips), strict=True):
            current, coefficients = level(current, skip)
            gates.append(coefficients)
        segmentation = resize_to(self.output_conv(current), image.shape[2:])
        localization = self.combine_gates(gates, image.shape[2:]) if explain else None
        return ModelOutput(segmentation=segmentation, attention=tuple(gates), localization=localization)

    @staticmethod
    def combine_gates(gates: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """Average of the (B, 1, *s_l) gate maps resized to ``size``: one (B, 1, *S) map in [0, 1]."""
        return torch.stack([resize_maps(gate, size) for gate in gates]).mean(dim=0).clamp(0.0, 1.0)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``encoder``, ``gates`` (every attention gate) and ``decoder`` (upsampling, merging, output convolution)."""
        gates = [p for level in self.decoder for p in level.gate.parameters()]
        gate_ids = {id(p) for p in gates}
        decoder = [p for p in [*self.decoder.parameters(), *self.output_conv.parameters()] if id(p) not in gate_ids]
        return {"encoder": list(self.encoder.parameters()), "gates": gates, "decoder": decoder}

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``dice`` and ``cross_entropy`` against ``batch["mask"]`` (class indices); ``gate_sparsity`` if enabled."""
        if "mask" not in batch:
            raise KeyError(f"{self.name}: the batch needs a 'mask' (B, 1, *S) of class indices; "
                           f"got keys {sorted(batch)}")
        if output.segmentation is None:
            raise ValueError(f"{self.name}: output has no segmentation to compute the loss from")
        target = batch["mask"]
        expected = (output.segmentation.shape[0], 1, *output.segmentation.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(f"{self.name}: batch['mask'] must have shape {expected}, got {tuple(target.shape)}")
        target = target.long()
        terms = {"dice": self.loss.dice(output.segmentation, target),
                 "cross_entropy": self.loss.ce(output.segmentation, target)}
        if self.gate_sparsity:
            terms["gate_sparsity"] = gate_sparsity_loss(self.name, output.attention)
        return terms


def _create_attention_unet(spatial_dims: int, **kwargs: Any) -> AttentionUNet:
    return AttentionUNet(spatial_dims, **kwargs)


@register_model(expected_parameters={2: 145_301, 3: 414_165})
def attention_unet(spatial_dims: int, **kwargs: Any) -> AttentionUNet:
    """Attention U-Net segmenter (Oktay et al. 2018) returning its gate maps (2D and 3D)."""
    return _create_attention_unet(spatial_dims, **kwargs)
