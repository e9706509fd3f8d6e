"""ProtoPNet: classify by similarity to prototypical latent patches, for 2D and 3D scans.

Chen, Li, Tao, Barnett, Su, Rudin, "This Looks Like That: Deep Learning for Interpretable Image Recognition",
NeurIPS 2019, https://arxiv.org/abs/1806.10574. Backbone (any of :mod:`pellucid.models.backbones`) -> add-on
(1x1 convolutions, sigmoid) -> squared-L2 (or cosine) distance of every prototype to every latent patch ->
log similarity, min-pooled -> bias-free last layer. The prototype layer, loss terms and localization are shared
with XProtoNet in :mod:`pellucid.models.prototypes`; training protocol (warm-up, joint, push, last layer) is
configured with :class:`pellucid.training.PhaseSchedule` and :class:`pellucid.training.prototypes.push.PrototypePush`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


class ProtoPNet(PrototypeNetwork):
    """Backbone, add-on layers, prototypes compared with every latent patch, linear last layer.

    Outputs ``logits``, ``prototype_similarity`` (B, P) and, when explained, ``prototype_maps`` (B, P, *s)
    (similarity of each prototype at each latent patch) and ``localization`` (B, K, *S): the last-layer weights
    times the prototype maps, upsampled to the input and scaled to [0, 1] per map. With ``explain=False`` the maps
    are built only when a loss term reads them (mask guidance).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Classes ``K``.
        backbone: Backbone name (see :mod:`pellucid.models.backbones`).
        backbone_kwargs: Extra arguments for the backbone.
        prototypes_per_class: Prototypes per class.
        prototype_channels: Latent channels ``D`` of the add-on output and the prototypes.
        metric: ``"l2"`` (squared Euclidean, the paper's) or ``"cosine"``.
        epsilon: ``eps`` of the similarity ``log((d + 1) / (d + eps))``.
        incorrect_class_connection: Initial last-layer weight to the other classes (-0.5 in the paper).
        mask_guidance: Add the ``mask_guidance`` loss term (activation outside the lesion mask).
        mask_guidance_temperature: Temperature of the mask-guidance spatial softmax.
        concept_guidance: Add the ``concept_guidance`` loss term: a linear probe must read each lesion's annotated
            findings (batch ``concepts``) from its latent patches (see
            :func:`~pellucid.models.prototype_losses.concept_guidance_loss`).
        concepts: Specifications of the batch's ``concepts`` columns (the training module passes the data's).
        guided_concepts: Names of the concepts the guidance teaches (``None``: all).
        concept_guidance_min_share: Cells the guidance teaches (0: every cell the lesion touches; default: those it
            covers at least half as well as its best-covered cell).
        prototype_diversity: Add the ``diversity`` loss term (same-class prototypes kept apart).
        localization_interpolation: ``"linear"`` or ``"cubic"`` (ProtoPNet's) upsampling of the class evidence.
        mask_guidance_resolution: ``"feature"`` or ``"input"``: mask guidance on the feature cells or on the maps
            upsampled like ``localization``.
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
        metric: PrototypeMetric = "l2",
        epsilon: float = 1e-4,
        incorrect_class_connection: float = -0.5,
        mask_guidance: bool = False,
        mask_guidance_temperature: float = 1.0,
        concept_guidance: bool = False,
        concepts: Sequence[ConceptSpec | dict[str, Any]] | None = None,
        guided_concepts: Sequence[str] | None = None,
        concept_guidance_min_share: float = 0.5,
        prototype_diversity: bool = False,
        localization_interpolation: str = "linear",
        mask_guidance_resolution: str = "feature",
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_classes, prototypes_per_class=prototypes_per_class,
                         prototype_channels=prototype_channels, metric=metric, epsilon=epsilon,
                         incorrect_class_connection=incorrect_class_connection, mask_guidance=mask_guidance,
                         mask_guidance_temperature=mask_guidance_temperature, concept_guidance=concept_guidance,
                         concepts=concepts, guided_concepts=guided_concepts,
                         concept_guidance_min_share=concept_guidance_min_share,
                         prototype_diversity=prototype_diversity,
                         localization_interpolation=localization_interpolation,
                         mask_guidance_resolution=mask_guidance_resolution)
        self.backbone = create_backbone(backbone, spatial_dims, in_channels, **(backbone_kwargs or {}))
        self.add_on = add_on_layers(spatial_dims, self.backbone.out_channels, prototype_channels)

    def add_on_parameters(self) -> list[nn.Parameter]:
        """The add-on convolutions."""
        return list(self.add_on.parameters())

    def forward_features(self, image: Tensor) -> Tensor:
        """(B, C, *S) image -> (B, D, *s) latent patches in [0, 1]."""
        return self.add_on(self.backbone(image))

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:
        """Classify by prototype similarity; ``explain`` adds the class-evidence ``localization``."""
        self.check_input(image)
        features = self.forward_features(image)
        if self.loss_reads_maps():  # mask guidance: the maps as they were always computed (training bit-identical)
            distance_maps = self.prototypes.distances(features)  # (B, P, *s)
            smallest = distance_maps.flatten(2).min(dim=2).values  # min-pooling over locations
            prototype_maps = self.prototypes.similarity(distance_maps)
        elif explain:  # maps for the explanation only: the same values from one product, minima from that tensor
            located = self.prototypes.patch_distances(features)  # (B, N, P)
            smallest = located.min(dim=1).values
            maps = located.view(features.shape[0], *features.shape[2:], -1).movedim(-1, 1)  # (B, P, *s) view
            prototype_maps = self.prototypes.similarity(maps)
        else:  # a training step that reads no maps: the (B, P) minima only, nothing full-size kept for backward
            smallest, prototype_maps = self.prototypes.smallest_distances(features), None
        return self.make_output(image, smallest, prototype_maps, explain,
                                patch_concept_logits=self.patch_concepts(features))

    def push_candidates(self, image: Tensor) -> PushCandidates:
        """Every latent patch of every image is a candidate for every prototype."""
        self.check_input(image)
        features = self.forward_features(image)  # (B, D, *s)
        distances = self.prototypes.patch_distances(features).transpose(1, 2)  # (B, P, N): the maps' values
        vectors = features.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, D): shared by all prototypes
        return PushCandidates(distances=distances, vectors=vectors, feature_size=tuple(features.shape[2:]))


def _create_protopnet(spatial_dims: int, concepts: Sequence[ConceptSpec] | None = None, **kwargs: Any) -> ProtoPNet:
    # the training module passes the data's concepts to every builder that takes them; only guidance reads them
    return ProtoPNet(spatial_dims, concepts=concepts if kwargs.get("concept_guidance") else None, **kwargs)


@register_model(expected_parameters={2: 105_866, 3: 295_370})
@takes_concepts
def protopnet(spatial_dims: int, concepts: Sequence[ConceptSpec] | None = None, **kwargs: Any) -> ProtoPNet:
    """ProtoPNet ("this looks like that") on the small MONAI residual encoder, 10 prototypes per class."""
    return _create_protopnet(spatial_dims, concepts, **{"backbone": "monai/convnet", **kwargs})


@register_model(expected_parameters={2: 105_866, 3: 295_370})
@takes_concepts
def protopnet_cosine(spatial_dims: int, concepts: Sequence[ConceptSpec] | None = None, **kwargs: Any) -> ProtoPNet:
    """ProtoPNet with cosine distance (1 - cosine similarity) instead of squared L2."""
    return _create_protopnet(spatial_dims, concepts, **{"backbone": "monai/convnet", "metric": "cosine", **kwargs})

