"""Black-box baseline: backbone, global pooling, linear head; localization from Grad-CAM.

Not interpretable by design: it exists so every comparison (accuracy, localization, faithfulness)
runs against a conventional CNN through the same ``ModelOutput`` contract. Grad-CAM (Selvaraju et al.,
ICCV 2017, https://arxiv.org/abs/1610.02391) is computed from the forward pass's own feature map
(:func:`pellucid.models.gradcam.grad_cam`; equal to ``monai.visualize.GradCAM`` in eval mode); with the default
average pooling in closed form, without a backward pass (:func:`pellucid.models.gradcam.linear_head_grad_cam`).

Explanation protocol: ``explanation_head()`` is the linear classifier over the pooled features (recomputed from the
image), so the logits are exactly reconstructible from them, though those features explain nothing by themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.networks.layers.factories import Pool
from torch import Tensor, nn

from pellucid.models.backbones import create_backbone
from pellucid.models.base import InterpretableModel
from pellucid.models.explanation import LinearExplanationHead
from pellucid.models.gradcam import grad_cam, linear_head_grad_cam
from pellucid.models.maps import check_interpolation
from pellucid.models.output import ModelOutput
from pellucid.models.registry import register_model


class BlackBox(InterpretableModel):
    """Backbone + global pooling + linear classifier, explained post hoc by Grad-CAM.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Classes ``K``.
        backbone: Backbone name (see :mod:`pellucid.models.backbones`).
        backbone_kwargs: Extra arguments for the backbone.
        pooling: ``"avg"`` or ``"max"`` global pooling.
        dropout: Dropout before the linear head.
        localization_interpolation: Upsampling of the Grad-CAM maps, ``"linear"`` or ``"cubic"`` (to compare with
            a prototype network that upsamples its evidence that way).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        num_classes: int = 2,
        backbone: str = "monai/convnet",
        backbone_kwargs: dict[str, Any] | None = None,
        pooling: str = "avg",
        dropout: float = 0.0,
        localization_interpolation: str = "linear",
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_classes)
        pool_types = {"avg": Pool.ADAPTIVEAVG, "max": Pool.ADAPTIVEMAX}
        if pooling not in pool_types:
            raise ValueError(f"blackbox: pooling must be 'avg' or 'max', got {pooling!r}")
        self.localization_interpolation = check_interpolation(localization_interpolation,
                                                              "blackbox: localization_interpolation")
        self.backbone = create_backbone(backbone, spatial_dims, in_channels, **(backbone_kwargs or {}))
        self.feature_map = nn.Identity()  # Grad-CAM's target layer: the backbone's output (a seam for hooks)
        self.pooling_name = pooling
        self.pool = Pool[pool_types[pooling], spatial_dims](1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.backbone.out_channels, num_classes)

    def forward_features(self, image: Tensor) -> Tensor:
        """(B, C, *S) image -> (B, F, *s) feature map."""
        return self.feature_map(self.backbone(image))

    def forward_head(self, features: Tensor) -> Tensor:
        """(B, F, *s) feature map -> (B, K) logits."""
        return self.classifier(self.dropout(self.pool(features).flatten(1)))

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:
        """Classify; with ``explain`` also compute one Grad-CAM map per class (:meth:`grad_cam`)."""
        self.check_input(image)
        features = self.forward_features(image)
        logits = self.forward_head(features)
        return ModelOutput(logits=logits, localization=self.grad_cam(features, image.shape[2:]) if explain else None)

    def grad_cam(self, features: Tensor, size: Sequence[int]) -> Tensor:
        """(B, K, *S) Grad-CAM maps of every class from the (B, F, *s) feature map, in [0, 1], detached.

        With average pooling and no active dropout the head is exactly average pooling + linear layer, so Grad-CAM
        is computed in closed form (:func:`~pellucid.models.gradcam.linear_head_grad_cam`, no backward pass);
        otherwise by one backward pass through the head per class.
        """
        if self.pooling_name == "avg" and (self.dropout.p == 0 or not self.training):
            return linear_head_grad_cam(self.classifier.weight, features, size, self.localization_interpolation)
        return grad_cam(self.forward_head, features, size, self.num_classes, self.localization_interpolation)

    def explanation_head(self) -> LinearExplanationHead:
        """The linear classifier over the globally pooled features (dropout is the identity in eval mode)."""
        return LinearExplanationHead("pooled_features", self.classifier.weight, self.classifier.bias,
                                     lambda image, _output: self.pool(self.forward_features(image)).flatten(1))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone`` and ``head`` (the linear classifier)."""
        return {"backbone": list(self.backbone.parameters()), "head": list(self.classifier.parameters())}


def _create_blackbox(spatial_dims: int, **kwargs: Any) -> BlackBox:
    return BlackBox(spatial_dims, **kwargs)


@register_model(expected_parameters={2: 95_731, 3: 285_235})
def blackbox(spatial_dims: int, **kwargs: Any) -> BlackBox:
    """Black-box baseline on the small MONAI residual encoder (2D and 3D)."""
    return _create_blackbox(spatial_dims, **{"backbone": "monai/convnet", **kwargs})


@register_model(expected_parameters={2: 1_228_323, 3: 3_597_027})
def blackbox_resnet10(spatial_dims: int, **kwargs: Any) -> BlackBox:
    """Black-box baseline on MONAI's ResNet-10 with narrow stages (2D and 3D)."""
    return _create_blackbox(spatial_dims, **{"backbone": "monai/resnet10", **kwargs})
