"""B-cos networks: a dynamic-linear ResNet-style encoder and the ``bcos`` family, in 2D and 3D.

Böhle, Fritz and Schiele, "B-cos Networks: Alignment is All We Need for Interpretability", CVPR 2022
(https://arxiv.org/abs/2205.10268); B-cos v2 (TPAMI 2024, https://github.com/B-cos/B-cos-v2) for the ResNet
without activations, the bias-free normalisations, the 1x1 B-cos classifier before global pooling and the binary
cross-entropy loss. The layers are in :mod:`pellucid.models.bcos_layers`.

Every layer is dynamic linear and nothing adds a bias, so the logits are ``W(x) x`` for the encoded input
``x = [image, 1 - image]``. The explanation is that product itself: the *contribution* of input element ``i`` to
class ``k`` is ``W_k(x)_i x_i``, computed exactly as ``x × ∂logit_k/∂x`` in a forward pass whose input-dependent
scales are detached (one backward pass per class, to the input only). Summed over the spatial axes the contributions
give the logits, up to float rounding (the tests and the report card check a relative error <= 1e-4).

Output (``forward(image, explain=True)``):

- ``logits`` (B, K): the classifier's per-location outputs averaged (B-cos v2; or maximised) over the feature map;
  no bias. Both poolings are dynamic linear (max selects one location's linear map). On the 2D phantom at the black
  box's budget average pooling localizes better (``docs/benchmarks/bcos.md``, seeds 0-2: pointing game 0.99 against
  0.95 for max pooling, accuracy 0.911 against 0.908), although after 3 epochs it was far behind (0.57 against 0.95:
  early on every background location adds a little evidence).
- ``localization`` (B, K, *S) in [0, 1]: the positive contributions of each class (summed over the encoded
  channels), optionally averaged over a ``localization_smoothing`` box, divided by their maximum per sample and
  class; all zeros where a class has no positive contribution. Negative evidence is not shown in it.
- ``aux["contributions"]`` (B, K, *S), float32: the raw contributions summed over the encoded channels (both
  ``x`` and ``1 - x`` of every image channel sit at the same location), so that
  ``aux["contributions"].flatten(2).sum(2)`` equals ``logits``; :meth:`BcosNetwork.logit_contributions` returns it
  (the explanation protocol), and the report card's transparency element checks the sum.

``explain=False`` (training) runs the plain forward pass only: no contributions, no localization.

Loss: binary cross-entropy on one-hot targets (``loss="bce"``, B-cos v2's choice: each class logit is judged by
itself, so a class's contributions are evidence for that class rather than evidence relative to the others);
``loss="cross_entropy"`` gives softmax cross-entropy. Multi-label targets always use binary cross-entropy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pellucid.models.backbones import Backbone, check_backbone_options
from pellucid.models.base import InputError, InterpretableModel, classification_loss
from pellucid.models.bcos_layers import NORMS, BcosConv, create_norm, encode_inverse
from pellucid.models.output import ModelOutput
from pellucid.models.registry import register_model

CONTRIBUTIONS = "contributions"  # the aux key of the raw (B, K, *S) contributions
Pooling = Literal["avg", "max"]
LossName = Literal["bce", "cross_entropy"]


class BcosBlock(nn.Module):
    """Residual block of two 3x3 B-cos convolutions, each followed by a bias-free norm; no activation (B-cos v2).

    The shortcut is the identity, or a 1x1 B-cos convolution and norm where the stride or width changes.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (and of the shortcut).
        b: B of every B-cos convolution.
        norm: Normalisation name (:data:`~pellucid.models.bcos_layers.NORMS`).
        max_out: MaxOut units per output channel.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1, b: float = 2.0,
                 norm: str = "batch", max_out: int = 1) -> None:
        super().__init__()
        self.conv1 = BcosConv(spatial_dims, in_channels, out_channels, 3, stride, b=b, max_out=max_out)
        self.norm1 = create_norm(norm, out_channels)
        self.conv2 = BcosConv(spatial_dims, out_channels, out_channels, 3, 1, b=b, max_out=max_out)
        self.norm2 = create_norm(norm, out_channels)
        self.shortcut: BcosConv | None = None
        self.shortcut_norm: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = BcosConv(spatial_dims, in_channels, out_channels, 1, stride, b=b, max_out=max_out)
            self.shortcut_norm = create_norm(norm, out_channels)

    def forward(self, x: Tensor, detach: bool = False) -> Tensor:
        """(B, in, *S) -> (B, out, *s); ``detach``: explanation mode."""
        branch = self.norm2(self.conv2(self.norm1(self.conv1(x, detach), detach), detach), detach)
        if self.shortcut is None or self.shortcut_norm is None:
            return branch + x
        return branch + self.shortcut_norm(self.shortcut(x, detach), detach)


class BcosResNet(Backbone):
    """A small B-cos ResNet encoder (2D and 3D): ``[x, 1 - x]`` encoding, a 3x3 B-cos stem, residual stages.

    A backbone (``"bcos/resnet"`` in :mod:`pellucid.models.backbones`): ``forward(x)`` returns the last stage's
    feature map; ``forward(x, detach=True)`` is its explanation mode.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels (the stem sees twice as many with ``encode``).
        channels: Output channels of each stage.
        strides: Stride of each stage's first block.
        blocks: Residual blocks per stage (one int for every stage, or one per stage).
        stem_channels: Channels of the stem convolution (default: the first stage's).
        stem_stride: Stride of the stem convolution.
        b: B of every B-cos convolution.
        norm: ``"batch"`` (un-centred), ``"position"`` or ``"none"`` (:mod:`pellucid.models.bcos_layers`).
        max_out: MaxOut units per output channel.
        encode: Encode the input as ``[x, 1 - x]`` (B-cos for images in [0, 1]).
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int] = (16, 32, 64),
                 strides: Sequence[int] = (1, 2, 2), blocks: int | Sequence[int] = 1, stem_channels: int | None = None,
                 stem_stride: int = 2, b: float = 2.0, norm: str = "batch", max_out: int = 1,
                 encode: bool = True) -> None:
        super().__init__()
        counts = [blocks] * len(channels) if isinstance(blocks, int) else list(blocks)
        if not channels or len(strides) != len(channels) or len(counts) != len(channels) or min(counts) < 1:
            raise ValueError(f"bcos encoder: channels, strides and blocks need one entry per stage (blocks >= 1), got "
                             f"channels={list(channels)} strides={list(strides)} blocks={blocks!r}")
        if norm not in NORMS:
            raise ValueError(f"bcos encoder: norm must be one of {list(NORMS)}, got {norm!r}")
        self.spatial_dims, self.in_channels, self.encode = spatial_dims, in_channels, encode
        self.encoded_channels = 2 * in_channels if encode else in_channels
        width = stem_channels or channels[0]
        self.stem = BcosConv(spatial_dims, self.encoded_channels, width, 3, stem_stride, b=b, max_out=max_out)
        self.stem_norm = create_norm(norm, width)
        stages = []
        for out, stride, count in zip(channels, strides, counts, strict=True):
            stage = [BcosBlock(spatial_dims, width, out, stride, b, norm, max_out)]
            stage += [BcosBlock(spatial_dims, out, out, 1, b, norm, max_out) for _ in range(count - 1)]
            stages.append(nn.ModuleList(stage))
            width = out
        self.stages = nn.ModuleList(stages)
        self.out_channels, self.stride = width, stem_stride * prod(strides)

    def encode_input(self, image: Tensor) -> Tensor:
        """The input the first layer reads: ``[x, 1 - x]`` (with ``encode``) or the image itself."""
        return encode_inverse(image) if self.encode else image

    def forward_encoded(self, encoded: Tensor, detach: bool = False) -> Tensor:
        """(B, encoded_channels, *S) encoded input -> (B, out_channels, *s) features."""
        x = self.stem_norm(self.stem(encoded, detach), detach)
        for stage in self.stages:
            for block in stage:
                x = block(x, detach)
        return x

    def forward(self, x: Tensor, detach: bool = False) -> Tensor:
        """(B, in_channels, *S) image -> (B, out_channels, *s) features."""
        return self.forward_encoded(self.encode_input(x), detach)


def box_smooth(maps: Tensor, width: int) -> Tensor:
    """Mean of each (B, K, *S) map over a ``width``-wide box around every location (zero-padded, same size)."""
    if width <= 1:
        return maps
    pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[maps.ndim - 2]
    return pool(maps, width, stride=1, padding=width // 2, count_include_pad=True)


def positive_share_of_peak(contributions: Tensor) -> Tensor:
    """``max(c, 0) / max(c)`` per (sample, class) map; all zeros for a map without a positive value."""
    positive = contributions.clamp_min(0.0)
    peak = positive.flatten(2).amax(dim=2).view(*positive.shape[:2], *[1] * (positive.ndim - 2))
    return positive / torch.where(peak > 0, peak, torch.ones_like(peak))


class BcosNetwork(InterpretableModel):
    """B-cos classifier: B-cos encoder, 1x1 B-cos classifier per location, global pooling; explained by W(x)·x.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Classes ``K``.
        backbone_kwargs: Options of the encoder (:class:`BcosResNet`: ``channels``, ``strides``, ``blocks``, ``b``,
            ``norm`` ...).
        pooling: ``"avg"`` (default, B-cos v2) or ``"max"`` global pooling of the classifier's per-location
            outputs; both keep the network dynamic linear (see the module docstring).
        loss: ``"bce"`` (binary cross-entropy on one-hot targets, B-cos v2) or ``"cross_entropy"``.
        localization_smoothing: Width of the box the positive contributions are averaged over before they are
            scaled to [0, 1] (1 or 0: none; pixel contributions are speckled, a box of a few pixels shows regions).
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, num_classes: int = 2,
                 backbone_kwargs: dict[str, Any] | None = None, pooling: Pooling = "avg", loss: LossName = "bce",
                 localization_smoothing: int = 0) -> None:
        super().__init__(spatial_dims, in_channels, num_classes)
        if pooling not in ("avg", "max"):
            raise ValueError(f"bcos: pooling must be 'avg' or 'max', got {pooling!r}")
        if loss not in ("bce", "cross_entropy"):
            raise ValueError(f"bcos: loss must be 'bce' or 'cross_entropy', got {loss!r}")
        if isinstance(localization_smoothing, bool) or not isinstance(localization_smoothing, int) \
                or localization_smoothing < 0:
            raise ValueError(f"bcos: localization_smoothing must be an integer >= 0, got {localization_smoothing!r}")
        options = dict(backbone_kwargs or {})
        check_backbone_options("bcos/resnet", options)  # a misspelled key names the valid ones
        self.pooling, self.loss, self.localization_smoothing = pooling, loss, localization_smoothing
        self.encoder = BcosResNet(spatial_dims, in_channels, **options)
        self.classifier = BcosConv(spatial_dims, self.encoder.out_channels, num_classes, 1,
                                   b=options.get("b", 2.0))

    def forward_encoded(self, encoded: Tensor, detach: bool = False) -> Tensor:
        """(B, encoded channels, *S) -> (B, K) logits."""
        evidence = self.classifier(self.encoder.forward_encoded(encoded, detach), detach).flatten(2)
        return evidence.mean(dim=2) if self.pooling == "avg" else evidence.amax(dim=2)

    def contributions(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Exact contributions ``W(x)·x`` of every input location to every logit.

        Returns:
            ``(logits, contributions)``: (B, K) logits of the explanation pass (equal in value to the plain
            forward's) and (B, K, *S) float32 contributions summed over the encoded channels; both detached.
        """
        # evaluation may run under inference mode; the explanation needs autograd on a normal copy of the input
        with torch.inference_mode(False), torch.enable_grad():
            source = image.clone() if image.is_inference() else image.detach()
            encoded = self.encoder.encode_input(source).detach().requires_grad_(True)
            logits = self.forward_encoded(encoded, detach=True)
            maps = []
            for k in range(self.num_classes):
                (weight,) = torch.autograd.grad(logits[:, k].sum(), encoded, retain_graph=k < self.num_classes - 1)
                maps.append((weight * encoded.detach()).sum(dim=1).float())
        return logits.detach(), torch.stack(maps, dim=1)

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:
        """Classify; with ``explain`` also return the contributions and the localization (module docstring)."""
        self.check_input(image)
        if not explain:
            return ModelOutput(logits=self.forward_encoded(self.encoder.encode_input(image)))
        logits, contributions = self.contributions(image)
        if torch.is_grad_enabled():  # a caller that trains through an explained forward gets the training graph
            logits = self.forward_encoded(self.encoder.encode_input(image))
        localization = positive_share_of_peak(box_smooth(contributions, self.localization_smoothing))
        return ModelOutput(logits=logits, localization=localization.clamp_(0.0, 1.0),
                           aux={CONTRIBUTIONS: contributions})

    def logit_contributions(self, output: ModelOutput) -> Tensor | None:
        """(B, K, *S) raw contributions of the explained ``output``; ``None`` when it was not explained."""
        return output.aux.get(CONTRIBUTIONS)

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``classification``: binary cross-entropy on one-hot targets (``loss="bce"``) or cross-entropy."""
        if output.logits is None:
            raise NotImplementedError("bcos: the output has no logits")
        label = batch["label"]
        if self.loss == "cross_entropy" or label.ndim != 1:
            return {"classification": classification_loss(output.logits, label)}
        if int(label.min()) < 0 or int(label.max()) >= self.num_classes:
            raise InputError(f"bcos: labels must lie in [0, {self.num_classes - 1}], got "
                             f"[{int(label.min())}, {int(label.max())}]")
        target = F.one_hot(label.long(), self.num_classes).to(output.logits.dtype)
        return {"classification": F.binary_cross_entropy_with_logits(output.logits, target)}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone`` (the B-cos encoder) and ``head`` (the 1x1 B-cos classifier)."""
        return {"backbone": list(self.encoder.parameters()), "head": list(self.classifier.parameters())}


@register_model(expected_parameters={2: 77_104, 3: 225_136})
def bcos(spatial_dims: int, **kwargs: Any) -> BcosNetwork:
    """B-cos network (B=2, un-centred batch norm), explained exactly by its contributions W(x)·x (2D and 3D)."""
    return BcosNetwork(spatial_dims, **kwargs)
