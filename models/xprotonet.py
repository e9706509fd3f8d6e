"""XProtoNet: prototypes compared with features pooled by a learned occurrence map, for 2D and 3D scans.

Kim, Kim, Ye, "XProtoNet: Diagnosis in Chest Radiography with Global and Local Explanations", CVPR 2021,
https://arxiv.org/abs/2103.10663. Each prototype has its own occurrence map ``M_p`` (1x1 convolutions, sigmoid)
that says where in the image to look for it; the latent features are pooled with that map (a weighted mean, so
the pooled vector lives in the same [0, 1]^D space as a latent patch and push stays meaningful) and compared
with the prototype. Extra loss terms (unweighted):

- ``occurrence_sparsity``: mean occurrence value (L1 of the maps per location): prototypes look at small regions.
- ``transform_consistency``: mean ``|T(M(x)) - M(T(x))|`` for a random flip ``T`` of the image axes (the paper
  uses random affine maps; flips are the affine maps that map feature cells exactly onto feature cells).

Prototype layer, ``classification``/``cluster``/``separation``/``l1``/``mask_guidance`` terms and the class-evidence
localization are shared with ProtoPNet (:mod:`pellucid.models.prototypes`). ``prototype_maps`` are the occurrence
maps scaled by each prototype's similarity (built when explained or mask-guided); the raw occurrence maps, which the
extra terms read, travel in ``ModelOutput.aux["occurrence_maps"]`` (the other ``aux`` keys are listed in
:mod:`pellucid.models.prototypes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from pellucid.models.backbones import create_backbone
from pellucid.models.concept_layers import takes_concepts
from pellucid.models.concepts import ConceptSpec
from pellucid.models.output import ModelOutput
from pellucid.models.prototypes import (
    PrototypeMetric,
    PrototypeNetwork,
    PushCandidates,
    add_on_layers,
)
from pellucid.models.registry import register_model

_POOLING_EPS = 1e-6  # keeps the weighted mean finite when an occurrence map is all but zero


def occurrence_layers(spatial_dims: int, in_channels: int, hidden: int, num_prototypes: int) -> nn.Sequential:
    """The occurrence module: 1x1 convolution, ReLU, 1x1 convolution to one map per prototype, sigmoid."""
    conv = Conv[Conv.CONV, spatial_dims]
    return nn.Sequential(conv(in_channels, hidden, kernel_size=1), nn.ReLU(),
                         conv(hidden, num_prototypes, kernel_size=1), nn.Sigmoid())


class XProtoNet(PrototypeNetwork):
    """Backbone, feature add-on, occurrence module, prototypes compared with occurrence-pooled features.

    The ``add_on`` parameter group holds both the feature add-on and the occurrence module.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Classes ``K``.
        backbone: Backbone name (see :mod:`pellucid.models.backbones`).
        backbone_kwargs: Extra arguments for the backbone.
        prototypes_per_class: Prototypes per class.
        prototype_channels: Latent channels ``D``.
        occurrence_channels: Hidden channels of the occurrence module.
        metric: ``"l2"`` or ``"cosine"``.
        epsilon: ``eps`` of the log similarity.
        incorrect_class_connection: Initial last-layer weight to the other classes.
        mask_guidance: Add the ``mask_guidance`` loss term.
        mask_guidance_temperature: Temperature of the mask-guidance spatial softmax.
        localization_interpolation: ``"linear"`` or ``"cubic"`` (ProtoPNet's) upsampling of the class evidence.
        mask_guidance_resolution: ``"feature"`` or ``"input"``: mask guidance on the feature cells or on the maps
            upsampled like ``localization``.
        concept_guidance: Add the ``concept_guidance`` loss term on the latent patches the occurrence maps pool (as
            :class:`~pellucid.models.protopnet.ProtoPNet`'s).
        concepts: The data's concepts (given by the training module; read only with ``concept_guidance``).
        guided_concepts: Concepts the guidance teaches (default: every binary one).
        concept_guidance_min_share: Cells the guidance teaches (see ``ProtoPNet``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        num_classes: int = 2,
        backbone: str = "monai/convnet",
        backbone_kwargs: dict[str, Any] | None = None,
        prototypes_per_class: int = 10,
        prototype_channels: int = 64,
        occurrence_channels: int = 64,
        metric: PrototypeMetric = "l2",
        epsilon: float = 1e-4,
        incorrect_class_connection: float = -0.5,
        mask_guidance: bool = False,
        mask_guidance_temperature: float = 1.0,
        localization_interpolation: str = "linear",
        mask_guidance_resolution: str = "feature",
        concept_guidance: bool = False,
        concepts: Sequence[ConceptSpec | dict[str, Any]] | None = None,
        guided_concepts: Sequence[str] | None = None,
        concept_guidance_min_share: float = 0.5,
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_classes, prototypes_per_class=prototypes_per_class,
                         prototype_channels=prototype_channels, metric=metric, epsilon=epsilon,
                         incorrect_class_connection=incorrect_class_connection, mask_guidance=mask_guidance,
                         mask_guidance_temperature=mask_guidance_temperature, concept_guidance=concept_guidance,
                         concepts=concepts, guided_concepts=guided_concepts,
                         concept_guidance_min_share=concept_guidance_min_share,
                         localization_interpolation=localization_interpolation,
                         mask_guidance_resolution=mask_guidance_resolution)
        self.backbone = create_backbone(backbone, spatial_dims, in_channels, **(backbone_kwargs or {}))
        self.add_on = add_on_layers(spatial_dims, self.backbone.out_channels, prototype_channels)
        self.occurrence = occurrence_layers(spatial_dims, self.backbone.out_channels, occurrence_channels,
                                            self.prototypes.num_prototypes)

    def add_on_parameters(self) -> list[nn.Parameter]:
        """The feature add-on and the occurrence module."""
        return [*self.add_on.parameters(), *self.occurrence.parameters()]

    def pooled_features(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """(B, P, D) occurrence-pooled latent vectors and (B, P, *s) occurrence maps."""
        pooled, occurrence, _ = self._encode(image)
        return pooled, occurrence

    def _encode(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pooled vectors (B, P, D), occurrence maps (B, P, *s) and the latent patches (B, D, *s) they pool."""
        backbone_features = self.backbone(image)
        latent = self.add_on(backbone_features)  # (B, D, *s)
        features = latent.flatten(2)  # (B, D, N)
        occurrence = self.occurrence(backbone_features)  # (B, P, *s)
        weights = occurrence.flatten(2)  # (B, P, N)
        pooled = torch.einsum("bpn,bdn->bpd", weights, features) / (weights.sum(dim=2, keepdim=True) + _POOLING_EPS)
        return pooled, occurrence, latent

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:
        """Classify by similarity of occurrence-pooled features; ``explain`` adds class-evidence ``localization``."""
        self.check_input(image)
        pooled, occurrence, latent = self._encode(image)
        distances = self.prototypes.paired_distances(pooled)  # (B, P)
        prototype_maps = None
        if self.needs_maps(explain):  # the occurrence maps scaled by each prototype's similarity
            similarity = self.prototypes.similarity(distances)
            prototype_maps = occurrence * similarity.view(*similarity.shape, *([1] * self.spatial_dims))
        return self.make_output(image, distances, prototype_maps, explain, occurrence_maps=occurrence,
                                patch_concept_logits=self.patch_concepts(latent))

    def push_candidates(self, image: Tensor) -> PushCandidates:
        """One candidate per prototype and image: its pooled vector, located at the occurrence map's peak."""
        self.check_input(image)
        pooled, occurrence = self.pooled_features(image)
        distances = self.prototypes.paired_distances(pooled).unsqueeze(2)  # (B, P, 1)
        peak = occurrence.flatten(2).argmax(dim=2, keepdim=True)  # (B, P, 1)
        return PushCandidates(distances=distances, vectors=pooled.unsqueeze(2), feature_index=peak,
                              feature_size=tuple(occurrence.shape[2:]))

    def recipe_loss_weights(self) -> dict[str, float]:
        """The prototype weights, plus ``occurrence_sparsity`` 0.01 and ``transform_consistency`` 1 (Kim et al.)."""
        return {**super().recipe_loss_weights(), "occurrence_sparsity": 1e-2, "transform_consistency": 1.0}

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The prototype terms plus ``occurrence_sparsity`` and ``transform_consistency``."""
        terms = super().loss_terms(output, batch)
        occurrence = output.aux["occurrence_maps"]
        terms["occurrence_sparsity"] = occurrence.mean()
        axes = _random_axes(self.spatial_dims)
        transformed = self.occurrence(self.backbone(batch["image"].flip(axes)))
        terms["transform_consistency"] = (transformed - occurrence.flip(axes)).abs().mean()
        return terms


def _random_axes(spatial_dims: int) -> list[int]:
    """A random non-empty set of spatial axes (tensor axes 2, 3[, 4]) to flip."""
    code = int(torch.randint(1, 2**spatial_dims, (1,)).item())
    return [2 + axis for axis in range(spatial_dims) if code >> axis & 1]


def _create_xprotonet(spatial_dims: int, concepts: Sequence[ConceptSpec] | None = None, **kwargs: Any) -> XProtoNet:
    # the training module passes the data's concepts to every builder that takes them; only guidance reads them
    return XProtoNet(spatial_dims, concepts=concepts if kwargs.get("concept_guidance") else None, **kwargs)


@register_model(expected_parameters={2: 111_976, 3: 301_480})
@takes_concepts
def xprotonet(spatial_dims: int, concepts: Sequence[ConceptSpec] | None = None, **kwargs: Any) -> XProtoNet:
    """XProtoNet (occurrence maps) on the small MONAI residual encoder, 10 prototypes per class."""
    return _create_xprotonet(spatial_dims, concepts, **{"backbone": "monai/convnet", **kwargs})
