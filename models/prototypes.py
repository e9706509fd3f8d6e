"""The shared base of prototype networks ("this looks like that"): ProtoPNet's head, losses, recipe and protocol.

Chen et al., "This Looks Like That: Deep Learning for Interpretable Image Recognition", NeurIPS 2019,
https://arxiv.org/abs/1806.10574. The prototypes, their distances and provenance are the
:class:`~pellucid.models.prototype_layer.PrototypeLayer`; min-pooling over locations gives one similarity per
prototype; a bias-free last layer, initialised +1 to each prototype's own class and ``incorrect_class_connection``
(-0.5) to the others, turns similarities into logits. The family's method (warm-up, joint, push + last layer) is its
recipe (:meth:`PrototypeNetwork.default_recipe`).

Loss terms (unweighted; the shipped configs weight them 0.8 / 0.08 / 1e-4 as in the paper):

- ``classification``: cross-entropy (binary cross-entropy for multi-label targets).
- ``cluster``: mean over samples of the smallest distance to a prototype of the sample's own class.
- ``separation``: **already negated**: minus the mean smallest distance to a prototype of another class, so a
  positive weight reproduces the paper's ``CE + 0.8 Clst - 0.08 Sep`` (the logged value is negative).
- ``l1``: L1 norm of the last-layer weights that connect a prototype to another class.
- ``mask_guidance``, ``concept_guidance``, ``diversity`` (only when enabled): see
  :mod:`pellucid.models.prototype_losses`.

``prototype_maps`` (B, P, *s) are built only when something needs them (:meth:`PrototypeNetwork.needs_maps`):
``explain=True``, or a loss term that reads them (mask guidance). A plain training step computes the (B, P) smallest
distances without building or keeping any (B, P, *s) tensor for backward.

Keys of ``ModelOutput.aux`` (loss-only tensors, not part of the explanation contract):

- ``prototype_distances``: (B, P) smallest distance of each prototype to the image's latent patches (always).
- ``occurrence_maps``: (B, P, *s) where each prototype pools its features (XProtoNet only).
- ``patch_concept_logits``: (B, M, *s) the concept probe read at every latent patch, raw (binary logits, continuous
  z-scores); only with concept guidance.

Explanation protocol (:class:`~pellucid.models.base.InterpretableModel`): the last layer over
``prototype_similarity`` is the linear head, ``prototype_classes()`` and ``prototype_provenance()`` come from the
prototype layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pellucid.models.base import InterpretableModel, classification_loss
from pellucid.models.concept_layers import ConceptBank, resolve_concepts
from pellucid.models.concepts import ConceptSpec
from pellucid.models.explanation import LinearExplanationHead
from pellucid.models.gradcam import normalize_per_map
from pellucid.models.maps import check_interpolation, upsample_evidence
from pellucid.models.output import ModelOutput
from pellucid.models.prototype_layer import (
    PrototypeLayer,
    PrototypeMetric,
    PrototypeSource,
    PushCandidates,
    add_on_layers,
)
from pellucid.models.prototype_losses import (
    MASK_GUIDANCE_RESOLUTIONS,
    concept_guidance_loss,
    diversity_loss,
    mask_guidance_loss,
)
from pellucid.models.recipe import Phase, PushOptions, Recipe


class PrototypeNetwork(InterpretableModel):
    """Shared head of prototype networks: prototypes, last layer, loss terms and class-evidence localization.

    Subclasses build ``self.backbone`` and their latent layers, implement :meth:`forward` (using
    :meth:`make_output`) and :meth:`push_candidates`, and list their latent layers in :meth:`add_on_parameters`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Classes ``K``.
        prototypes_per_class: Prototypes per class (``P = K * prototypes_per_class``).
        prototype_channels: Latent channels ``D``.
        metric: ``"l2"`` or ``"cosine"``.
        epsilon: ``eps`` of the log similarity.
        incorrect_class_connection: Initial last-layer weight from a prototype to the other classes.
        mask_guidance: Add the ``mask_guidance`` loss term (batches without ``mask`` contribute 0). The optional
            terms and their helpers are in :mod:`pellucid.models.prototype_losses`.
        mask_guidance_temperature: Temperature of its spatial softmax (see ``mask_guidance_loss``).
        concept_guidance: Add the ``concept_guidance`` loss term (see ``concept_guidance_loss``): a linear probe
            must read each lesion's annotated findings from its latent patches. Needs ``concepts`` and ``mask`` in
            the training batches (batches without a mask contribute 0).
        concepts: The findings of the batch's ``concepts`` columns, in order (``None``: the generic default of
            :data:`~pellucid.models.concept_layers.DEFAULT_CONCEPTS`; the training module passes the data's);
            used only with ``concept_guidance``.
        guided_concepts: Names of the concepts the guidance teaches (``None``: all of ``concepts``).
        concept_guidance_min_share: Cells the guidance teaches: those the lesion covers at least this share as well
            as its best-covered cell (0: every cell it touches; see ``lesion_cells``).
        prototype_diversity: Add the ``diversity`` loss term (see ``diversity_loss``).
        localization_interpolation: How class evidence is upsampled to ``localization``: ``"linear"`` (the
            shipped bundles' default) or ``"cubic"`` (ProtoPNet's; its peak can fall between feature-cell centers,
            see :mod:`pellucid.models.maps`).
        mask_guidance_resolution: ``"feature"`` or ``"input"`` (the own-class part on the maps upsampled by
            ``localization_interpolation``; see ``mask_guidance_loss``).
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, prototypes_per_class: int = 10,
                 prototype_channels: int = 64, metric: PrototypeMetric = "l2", epsilon: float = 1e-4,
                 incorrect_class_connection: float = -0.5, mask_guidance: bool = False,
                 mask_guidance_temperature: float = 1.0, concept_guidance: bool = False,
                 concepts: Sequence[ConceptSpec | dict[str, Any]] | None = None,
                 guided_concepts: Sequence[str] | None = None, concept_guidance_min_share: float = 0.5,
                 prototype_diversity: bool = False, localization_interpolation: str = "linear",
                 mask_guidance_resolution: str = "feature") -> None:
        super().__init__(spatial_dims, in_channels, num_classes)
        if prototypes_per_class < 1:
            raise ValueError(f"prototypes_per_class must be >= 1, got {prototypes_per_class!r}")
        if prototype_channels < 1:
            raise ValueError(f"prototype_channels must be >= 1, got {prototype_channels!r}")
        classes = [k for k in range(num_classes) for _ in range(prototypes_per_class)]
        self.prototypes = PrototypeLayer(prototype_channels, classes, num_classes, metric=metric, epsilon=epsilon)
        self.last_layer = nn.Linear(len(classes), num_classes, bias=False)
        self.incorrect_class_connection = incorrect_class_connection
        if mask_guidance_temperature <= 0:
            raise ValueError(f"mask_guidance_temperature must be > 0, got {mask_guidance_temperature!r}")
        self.mask_guidance = mask_guidance
        self.mask_guidance_temperature = mask_guidance_temperature
        if mask_guidance_resolution not in MASK_GUIDANCE_RESOLUTIONS:
            raise ValueError(f"mask_guidance_resolution must be one of {list(MASK_GUIDANCE_RESOLUTIONS)}, "
                             f"got {mask_guidance_resolution!r}")
        self.localization_interpolation = check_interpolation(localization_interpolation, "localization_interpolation")
        self.mask_guidance_resolution = mask_guidance_resolution
        self.concept_guidance = concept_guidance
        self.prototype_diversity = prototype_diversity
        if not 0.0 <= concept_guidance_min_share <= 1.0:
            raise ValueError(f"concept_guidance_min_share must be in [0, 1], got {concept_guidance_min_share!r}")
        self.concept_guidance_min_share = concept_guidance_min_share
        if concept_guidance:
            self.concept_bank = ConceptBank(resolve_concepts(concepts))
            self.concept_probe = nn.Linear(prototype_channels, self.concept_bank.num_concepts)
            names = [spec.name for spec in self.concept_bank.concept_specs]
            unknown = sorted(set(guided_concepts or []) - set(names))
            if unknown:
                raise ValueError(f"guided_concepts: {unknown} are not among the concepts {names}")
            guided = [guided_concepts is None or name in guided_concepts for name in names]
            self.register_buffer("guided", torch.tensor(guided), persistent=False)
        elif guided_concepts is not None:
            raise ValueError("guided_concepts is set but concept_guidance is off; set concept_guidance: true")
        self.reset_last_layer()

    @torch.no_grad()
    def reset_last_layer(self) -> None:
        """Set the last layer to +1 from each prototype to its class and ``incorrect_class_connection`` elsewhere."""
        identity = self.prototypes.class_identity.t()  # (K, P)
        self.last_layer.weight.copy_(identity + self.incorrect_class_connection * (1.0 - identity))

    def add_on_parameters(self) -> list[nn.Parameter]:  # pragma: no cover - abstract
        """Parameters of the latent layers between backbone and prototypes (the ``add_on`` group)."""
        raise NotImplementedError

    def push_candidates(self, image: Tensor) -> PushCandidates:  # pragma: no cover - abstract
        """Distances and latent vectors push chooses prototypes from, for one batch (eval mode, no grad)."""
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone``, ``add_on`` (with the concept probe, when guided), ``prototypes`` and ``last_layer``."""
        add_on = self.add_on_parameters()
        if self.concept_guidance:
            add_on = [*add_on, *self.concept_probe.parameters()]
        return {"backbone": list(self.backbone.parameters()), "add_on": add_on,
                "prototypes": [self.prototypes.vectors], "last_layer": list(self.last_layer.parameters())}

    def patch_concepts(self, features: Tensor) -> Tensor | None:
        """(B, D, *s) latent patches -> (B, M, *s) raw concept probe output; ``None`` without concept guidance."""
        if not self.concept_guidance:
            return None
        return self.concept_probe(features.movedim(1, -1)).movedim(-1, 1)

    def class_weights(self) -> Tensor:
        """(K, P) last-layer weights with pruned prototypes' columns at zero."""
        return self.last_layer.weight * self.prototypes.active.to(self.last_layer.weight.dtype)

    def loss_reads_maps(self) -> bool:
        """Whether a loss term of this network reads ``prototype_maps`` (mask guidance does); subclasses may add."""
        return self.mask_guidance

    def needs_maps(self, explain: bool) -> bool:
        """Whether a forward builds the (B, P, *s) ``prototype_maps``: explanations asked for, or a loss reads them.

        Otherwise (a plain training step) only what the loss needs is computed: the (B, P) smallest distances. The
        maps are explanation work the prediction does not need; ``explain=True`` always returns them.
        """
        return explain or self.loss_reads_maps()

    def make_output(self, image: Tensor, distances: Tensor, prototype_maps: Tensor | None, explain: bool,
                    occurrence_maps: Tensor | None = None,
                    patch_concept_logits: Tensor | None = None) -> ModelOutput:
        """Logits and explanation from (B, P) smallest distances and (B, P, *s) prototype maps (``None``: not built).

        Pruned prototypes get similarity 0 everywhere: they no longer take part in the decision or the maps. The
        distances and the optional maps go in ``aux`` (keys in the module docstring).
        """
        active = self.prototypes.active.to(distances.dtype)
        similarity = self.prototypes.similarity(distances) * active
        if prototype_maps is not None:
            prototype_maps = prototype_maps * active.view(1, -1, *([1] * (prototype_maps.ndim - 2)))
        logits = self.last_layer(similarity)
        if explain and prototype_maps is None:
            raise ValueError(f"{self.name}.make_output: explain=True needs the prototype maps, got None")
        localization = self.class_evidence(prototype_maps, tuple(image.shape[2:])) if explain else None
        aux = {"prototype_distances": distances, "occurrence_maps": occurrence_maps,
               "patch_concept_logits": patch_concept_logits}
        return ModelOutput(logits=logits, localization=localization, prototype_similarity=similarity,
                           prototype_maps=prototype_maps, aux={k: v for k, v in aux.items() if v is not None})

    def class_evidence(self, prototype_maps: Tensor, size: tuple[int, ...]) -> Tensor:
        """(B, P, *s) maps -> (B, K, *S): last-layer weights times maps, upsampled, each map scaled to [0, 1]."""
        evidence = torch.einsum("kp,bp...->bk...", self.class_weights(), prototype_maps)
        return normalize_per_map(upsample_evidence(evidence, size, self.localization_interpolation))

    def own_prototypes(self, label: Tensor) -> Tensor:
        """(B, P) True where a prototype belongs to one of the sample's classes (index or multi-hot labels)."""
        identity = self.prototypes.class_identity  # (P, K)
        if label.ndim == 1:
            return identity[:, label.long()].t() > 0.5
        return (label.to(identity) @ identity.t()) > 0.5

    # ------------------------------------------------------------------------------ explanation protocol
    def explanation_head(self) -> LinearExplanationHead:
        """The bias-free last layer over ``prototype_similarity`` (pruned prototypes' similarity is already 0)."""
        return LinearExplanationHead("prototype_similarity", self.last_layer.weight, self.last_layer.bias,
                                     lambda _image, output: output.prototype_similarity)

    def prototype_classes(self) -> Tensor:
        """(P,) class index of each prototype."""
        return self.prototypes.prototype_classes

    def active_prototypes(self) -> Tensor:
        """(P,) bool, the prototypes pruning has not switched off."""
        return self.prototypes.active.bool()

    def prototype_provenance(self) -> list[dict[str, Any] | None]:
        """Push's record per prototype as plain values (``None`` until the prototype is pushed)."""
        return [None if source is None else source.to_dict() for source in self.prototypes.sources]

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``classification``, ``cluster``, ``separation`` (negated), ``l1``; if enabled the optional terms.

        ``mask_guidance``, ``concept_guidance`` and ``diversity`` (for ``concept_guidance``, in training mode the
        batch's concepts first update the probe's statistics).
        """
        distances = output.aux.get("prototype_distances")
        if distances is None:
            raise TypeError(f"{self.name}.loss_terms needs aux['prototype_distances'] from this model's forward, "
                            f"got aux keys {sorted(output.aux)}; pass the ModelOutput the model returned")
        label = batch["label"]
        own = self.own_prototypes(label)
        active = self.prototypes.active.unsqueeze(0)
        identity = self.prototypes.class_identity.t()  # (K, P)
        terms = {
            "classification": classification_loss(output.logits, label),
            "cluster": _masked_min_mean(distances, own & active),
            "separation": -_masked_min_mean(distances, ~own & active),
            "l1": (self.class_weights() * (1.0 - identity)).abs().sum(),
        }
        if self.mask_guidance:
            mask = batch.get("mask")
            maps = output.prototype_maps
            if maps is None:
                raise ValueError(f"{self.name}: mask_guidance reads output.prototype_maps, got None; pass the "
                                 "ModelOutput this model's forward returned")
            terms["mask_guidance"] = maps.sum() * 0.0 if mask is None else mask_guidance_loss(
                maps, mask, own, self.mask_guidance_temperature, self.mask_guidance_resolution,
                self.localization_interpolation)
        if self.concept_guidance:
            terms["concept_guidance"] = self._concept_guidance_term(output, batch)
        if self.prototype_diversity:
            terms["diversity"] = diversity_loss(self.prototypes.mutual_distances(),
                                                self.prototypes.prototype_classes, self.prototypes.active)
        return terms

    def _concept_guidance_term(self, output: ModelOutput, batch: Mapping[str, Tensor]) -> Tensor:
        """The ``concept_guidance`` term of one batch (0 in the graph for a batch without ``mask``)."""
        patch_concept_logits = output.aux.get("patch_concept_logits")
        if patch_concept_logits is None:
            raise ValueError(f"{self.name}: concept_guidance is on but the output has no aux['patch_concept_logits'] "
                             "(this architecture does not compute them)")
        targets = self.concept_bank.targets(batch, output.logits.shape[0])
        if self.training:
            self.concept_bank.update(targets)
        mask = batch.get("mask")
        if mask is None:
            return patch_concept_logits.sum() * 0.0
        targets = targets.masked_fill(~self.guided, float("nan"))  # concepts not guided count as not annotated
        return concept_guidance_loss(patch_concept_logits, targets, mask, self.concept_bank,
                                     self.concept_guidance_min_share)

    @torch.no_grad()
    def forget_training_data(self) -> list[str]:
        """Before training on other data: clear every prototype's provenance and undo pruning.

        Both were judged on the old data; the recipe's push and pruning redo them on the new. Returns one line per
        thing forgotten.
        """
        layer = self.prototypes
        pushed = sum(source is not None for source in layer.sources)
        pruned = int((~layer.active).sum())
        layer.sources = [None] * layer.num_prototypes
        layer.active.fill_(True)
        return [f"  forgot the provenance of {pushed} pushed prototype(s) and the pruning of {pruned}: push and "
                "pruning on this data redo them"] if pushed or pruned else []

    def recipe_loss_weights(self) -> dict[str, float]:
        """Weights of this network's loss terms in its recipe (only terms it makes, so none is unknown).

        The paper's CE + 0.8 cluster + 0.08 separation (returned negated) + 1e-4 L1; the guidance weights are the ones
        tuned on the 2D phantom (``docs/tuning_history.md``).
        """
        weights = {"cluster": 0.8, "separation": 0.08, "l1": 1e-4}
        if self.mask_guidance:
            weights["mask_guidance"] = 20.0
        if self.concept_guidance:
            weights["concept_guidance"] = 10.0
        if self.prototype_diversity:
            weights["diversity"] = 1.0
        return weights

    def default_recipe(self) -> Recipe:
        """ProtoPNet's protocol (Chen et al. 2019): warm-up, joint, then push and the last layer alone, twice.

        Warm-up trains the latent layers and prototypes with the backbone frozen; joint trains everything but the
        last layer; each ``last_layer`` phase starts with push (every prototype projected onto its nearest training
        patch of its class) and then trains only the last layer, so every fit ends pushed onto the data it trained
        on. Phase lengths are for 40 epochs and scale to any budget (:func:`pellucid.models.recipe.fit_phases`).
        """
        feature_groups = ["backbone", "add_on", "prototypes"]
        last_layer_lr = {"last_layer": 5.0e-2}
        return Recipe(
            phases=[
                Phase("warmup", 2, train=["add_on", "prototypes"]),
                Phase("joint", 15, train=feature_groups),
                Phase("last_layer", 1, train=["last_layer"], lr=last_layer_lr, push=True),
                Phase("joint_2", 16, train=feature_groups),
                Phase("last_layer_2", 6, train=["last_layer"], lr=last_layer_lr, push=True),
            ],
            push=PushOptions(),
            loss_weights=self.recipe_loss_weights(),
        )


def _masked_min_mean(distances: Tensor, allowed: Tensor) -> Tensor:
    """Mean over samples of the smallest allowed distance (samples with no allowed prototype are left out).

    No device synchronisation: when every sample has an allowed prototype (single-label data) the plain mean, else
    the sum over the valid samples divided by their number (0, in the graph, when there is none).
    """
    smallest = distances.masked_fill(~allowed, math.inf).min(dim=1).values
    valid = smallest < math.inf  # distances are >= 0 (or NaN, left out as before)
    masked_mean = torch.where(valid, smallest, 0.0).sum() / valid.sum().clamp_min(1)
    return torch.where(valid.all(), smallest.mean(), masked_mean)


__all__ = [
    "PrototypeLayer",
    "PrototypeMetric",
    "PrototypeNetwork",
    "PrototypeSource",
    "PushCandidates",
    "add_on_layers",
]
