"""Concept bottleneck models: image -> named concepts with units -> linear label head.

Koh et al., "Concept Bottleneck Models", ICML 2020 (https://arxiv.org/abs/2007.04612). The label is computed only
from the predicted concepts, so a user can read the decision (the linear head exports itself as a table) and
correct it: ``model(image, concept_mask=m, concept_values=v)`` sets concepts to values in their units and recomputes
the label from the corrected concepts.

Training modes (Koh et al.) are loss weights and phases of the one training module, not flags of the model. The
model makes three unweighted loss terms:

- ``classification``: cross-entropy (BCE for multi-label) of the label predicted from the predicted concepts,
- ``concept``: the concept loss (class-balanced BCE for binary concepts, MSE of z-scores for continuous ones;
  NaN annotations masked out),
- ``task_from_true_concepts``: the same loss for the label head applied to the TRUE concepts (unannotated entries
  take the detached prediction),

plus ``label_head_l1`` when ``sparse_head=True`` and ``mask_guidance`` when ``mask_guidance=True`` (each present
binary finding's concept map, and each measurement ``mask_guided_concepts`` names, must peak on the lesion mask:
:mod:`pellucid.models.concept_guidance`).
Joint: ``{concept: lambda, task_from_true_concepts: 0}``. Sequential: a phase training ``concept_encoder`` on
``concept`` only, then one training ``label_head`` on ``classification`` only. Independent: the same first phase,
then ``label_head`` on ``task_from_true_concepts`` only.

Localization: ``cbm`` pools the backbone's feature map globally, so each concept's logit is the mean of a linear
evidence map (the concept layer applied at every location, a class activation map) plus a bias; the class
localization is the label-head weights times these concept evidence maps, clamped at 0, upsampled and scaled to
[0, 1]; the evidence maps themselves are the ``concept_maps``. ``cbm_spatial`` reads every concept through its own
spatial attention (softmax over locations) and returns the attention maps as ``concept_maps``; the class
localization places each concept's contribution to the class logit (head weight x activation) where the concept
was read.

Explanation protocol: ``concept_specs``; ``explanation_head()`` is the label head rewritten over the concept values
in their units (probabilities for binary concepts, e.g. mm for continuous ones), which reconstructs the logits
exactly; interventions through ``forward``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from pellucid.models.backbones import create_backbone
from pellucid.models.base import InterpretableModel, classification_loss
from pellucid.models.concept_guidance import concept_map_guidance_loss, guided_concept_mask, guided_pairs
from pellucid.models.concept_layers import (
    ConceptBank,
    LinearLabelHead,
    evidence_to_localization,
    resolve_concepts,
    takes_concepts,
    unit_values,
)
from pellucid.models.concepts import ConceptSpec
from pellucid.models.explanation import LinearExplanationHead
from pellucid.models.output import ModelOutput
from pellucid.models.registry import register_model


class ConceptBottleneck(InterpretableModel):
    """Backbone -> concept layer (globally pooled, or read through per-concept attention) -> linear label head.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Classes ``K``.
        concepts: Concept specifications, in the order of the batch's ``concepts`` columns; ``None`` uses
            :data:`~pellucid.models.concept_layers.DEFAULT_CONCEPTS` (one binary, one continuous concept).
        backbone: Backbone name (see :mod:`pellucid.models.backbones`).
        backbone_kwargs: Extra arguments for the backbone.
        spatial_concepts: Read each concept through its own spatial attention and return ``concept_maps``.
        sparse_head: Add the ``label_head_l1`` loss term (L1 norm of the head's weights) for a sparse head.
        balanced_concept_loss: Class-balanced BCE for binary concepts.
        normalizer_samples: Annotated values per concept used to estimate the normalisation statistics.
        mask_guidance: Add the ``mask_guidance`` loss term: the concept map of every guided concept (see
            ``mask_guided_concepts``) must peak on the lesion mask (batches without ``mask`` contribute 0).
        mask_guidance_temperature: Temperature of that term's spatial softmax over the evidence maps (``cbm``); the
            attention of ``cbm_spatial`` already is a softmax and is taken as it is.
        mask_guided_concepts: The concepts ``mask_guidance`` guides
            (:func:`~pellucid.models.concept_guidance.guided_pairs`): ``None``, every binary finding annotated
            present; a list may add continuous measurements of the lesion (e.g. its diameter), guided on every scan
            with a lesion.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        num_classes: int = 2,
        concepts: Sequence[ConceptSpec] | None = None,
        backbone: str = "monai/convnet",
        backbone_kwargs: dict[str, Any] | None = None,
        spatial_concepts: bool = False,
        sparse_head: bool = False,
        balanced_concept_loss: bool = True,
        normalizer_samples: int = 2048,
        mask_guidance: bool = False,
        mask_guidance_temperature: float = 1.0,
        mask_guided_concepts: Sequence[str] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_classes)
        if mask_guidance_temperature <= 0:
            raise ValueError(f"cbm: mask_guidance_temperature must be > 0, got {mask_guidance_temperature!r}")
        specs = resolve_concepts(concepts)
        guided_concepts = guided_concept_mask("cbm", mask_guided_concepts, specs)
        self.backbone = create_backbone(backbone, spatial_dims, in_channels, **(backbone_kwargs or {}))
        conv = Conv[Conv.CONV, spatial_dims]
        features = self.backbone.out_channels
        # Bias kept apart so the evidence maps hold only what the image contributes at each location.
        self.concept_evidence = conv(features, len(specs), kernel_size=1, bias=False)
        self.concept_bias = nn.Parameter(torch.zeros(len(specs)))
        self.concept_attention = conv(features, len(specs), kernel_size=1) if spatial_concepts else None
        self.concept_bank = ConceptBank(specs, max_count=normalizer_samples)
        self.label_head = LinearLabelHead(len(specs), num_classes)
        self.spatial_concepts = spatial_concepts
        self.sparse_head = sparse_head
        self.balanced_concept_loss = balanced_concept_loss
        self.mask_guidance = mask_guidance
        self.mask_guidance_temperature = mask_guidance_temperature
        self.mask_guided_concepts = list(mask_guided_concepts) if mask_guided_concepts is not None else None
        self.register_buffer("mask_guided", guided_concepts, persistent=False)  # (M,) the guided concepts

    @property
    def concept_specs(self) -> list[ConceptSpec]:
        """The concepts the model predicts, in column order."""
        return self.concept_bank.concept_specs

    def forward_features(self, image: Tensor) -> Tensor:
        """(B, C, *S) image -> (B, F, *s) feature map."""
        return self.backbone(image)

    def forward_concepts(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Feature map -> ``(raw, evidence, attention)``.

        Returns:
            raw: (B, M) concept logits (binary) and z-scores (continuous).
            evidence: (B, M, *s) what each location contributes to each concept (bias excluded).
            attention: (B, M, *s) per-concept attention summing to 1 over locations (spatial variant), else None.
        """
        evidence = self.concept_evidence(features)
        if self.concept_attention is None:
            return evidence.flatten(2).mean(dim=2) + self.concept_bias, evidence, None
        attention_logits = self.concept_attention(features)
        attention = attention_logits.flatten(2).softmax(dim=2).view_as(attention_logits)
        raw = (attention * evidence).flatten(2).sum(dim=2) + self.concept_bias
        return raw, evidence, attention

    def forward(
        self,
        image: Tensor,
        *,
        explain: bool = True,
        concept_mask: Tensor | None = None,
        concept_values: Tensor | None = None,
    ) -> ModelOutput:
        """Predict concepts, then the label from them; optionally with concepts set by the caller.

        Args:
            image: (B, C, *S) float tensor.
            explain: Also compute the class localization (the concepts and their maps are always returned).
            concept_mask: (B, M) bool, which concepts to set (an intervention).
            concept_values: (B, M) values in the concepts' units for the set concepts: 0/1 (or a probability) for
                binary concepts, e.g. mm for continuous ones; ignored (may be NaN) where ``concept_mask`` is False.

        Returns:
            ``logits``, ``concept_logits`` (set concepts report the set value: ``logit(v)`` for binary ones),
            ``concept_maps`` (the evidence maps, bias excluded: their mean over locations plus the bias is the raw
            concept; the spatial variant: its attention) and, with ``explain``, ``localization``.
        """
        self.check_input(image)
        intervention = self.concept_bank.check_intervention(concept_mask, concept_values, image.shape[0])
        raw, evidence, attention = self.forward_concepts(self.forward_features(image))
        raw, activations = self.concept_bank.intervene(raw, intervention)
        logits = self.label_head(activations)
        localization = None
        if explain:
            weight = self.label_head.linear.weight  # (K, M)
            if attention is None:
                class_evidence = torch.einsum("km,bm...->bk...", weight, evidence)
            else:
                class_evidence = torch.einsum("km,bm,bm...->bk...", weight, activations, attention)
            localization = evidence_to_localization(class_evidence, image.shape[2:])
        return ModelOutput(logits=logits, localization=localization,
                           concept_logits=self.concept_bank.raw_to_unit(raw),
                           concept_maps=evidence if attention is None else attention)

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """``classification``, ``concept``, ``task_from_true_concepts`` (``label_head_l1``, ``mask_guidance`` if on).

        In training mode the batch's annotated concept values first update the normalisation statistics (they
        freeze after ``normalizer_samples`` values), then the predictions are compared on that scale.
        """
        targets = self.concept_bank.targets(batch, output.logits.shape[0])
        if self.training:  # first, so the very first batch is already compared on the normalised scale
            self.concept_bank.update(targets)
        raw = self.concept_bank.logits_to_raw(output.concept_logits)
        known = torch.isnan(targets).logical_not()
        true_activations = torch.where(known, self.concept_bank.unit_to_activations(torch.nan_to_num(targets)),
                                       self.concept_bank.activations(raw).detach())
        terms = {
            "classification": classification_loss(output.logits, batch["label"]),
            "concept": self.concept_bank.loss(raw, targets, balanced=self.balanced_concept_loss),
            "task_from_true_concepts": classification_loss(self.label_head(true_activations), batch["label"]),
        }
        if self.sparse_head:
            terms["label_head_l1"] = self.label_head.l1_penalty()
        if self.mask_guidance:
            terms["mask_guidance"] = self._mask_guidance_term(output, batch, targets)
        return terms

    def _mask_guidance_term(self, output: ModelOutput, batch: Mapping[str, Any], targets: Tensor) -> Tensor:
        """Off-lesion share of the present findings' concept maps (0, in the graph, without ``mask``)."""
        maps = output.concept_maps
        if maps is None:
            raise ValueError("cbm.loss_terms: mask_guidance needs the concept_maps of this model's forward; pass "
                             "the ModelOutput it returned")
        mask = batch.get("mask")
        if mask is None:
            return maps.sum() * 0.0
        if self.concept_attention is None:
            scores, temperature = maps, self.mask_guidance_temperature
        else:  # the attention is a softmax already: its log gives it back exactly
            scores, temperature = maps.clamp_min(torch.finfo(maps.dtype).tiny).log(), 1.0
        guided = guided_pairs(targets, mask, self.concept_bank, self.mask_guided)
        return concept_map_guidance_loss(scores, mask, guided, temperature)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``concept_encoder`` (backbone, concept layer and attention) and ``label_head``."""
        encoder = [p for name, p in self.named_parameters() if not name.startswith("label_head.")]
        return {"concept_encoder": encoder, "label_head": list(self.label_head.parameters())}

    def explanation_head(self) -> LinearExplanationHead:
        """The label head over the concept values in their units (see :meth:`LinearLabelHead.unit_weights`)."""
        weight, bias = self.label_head.unit_weights(self.concept_bank)
        specs = self.concept_specs
        return LinearExplanationHead("concept values in their units", weight, bias,
                                     lambda _image, output: unit_values(output.concept_logits, specs),
                                     [spec.name for spec in specs])

    def describe_head(self, class_names: Sequence[str] | None = None, min_abs: float = 0.0) -> str:
        """The label head as readable lines per class (see :meth:`LinearLabelHead.describe`)."""
        return self.label_head.describe(self.concept_bank, class_names, min_abs)


def _create_cbm(spatial_dims: int, **kwargs: Any) -> ConceptBottleneck:
    return ConceptBottleneck(spatial_dims, **kwargs)


@register_model(expected_parameters={2: 95_675, 3: 285_179})
@takes_concepts
def cbm(spatial_dims: int, concepts: list[ConceptSpec] | None = None, **kwargs: Any) -> ConceptBottleneck:
    """Concept bottleneck: pooled concepts, linear label head; localization from concept evidence maps (2D and 3D)."""
    return _create_cbm(spatial_dims, **{"concepts": concepts, "spatial_concepts": False, **kwargs})


@register_model(expected_parameters={2: 95_805, 3: 285_309})
@takes_concepts
def cbm_spatial(spatial_dims: int, concepts: list[ConceptSpec] | None = None, **kwargs: Any) -> ConceptBottleneck:
    """Concept bottleneck reading each concept through its own spatial attention (concept_maps) (2D and 3D)."""
    return _create_cbm(spatial_dims, **{"concepts": concepts, "spatial_concepts": True, **kwargs})
