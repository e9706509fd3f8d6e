"""Concept embedding model (CEM): a positive and a negative embedding per concept, mixed by the concept probability.

Espinosa Zarlenga et al., "Concept Embedding Models: Beyond the Accuracy-Explainability Trade-Off", NeurIPS 2022
(https://arxiv.org/abs/2209.09056). Each concept ``m`` gets two embeddings from the image, ``c+`` (concept present)
and ``c-`` (absent); a per-concept scoring function reads both and gives the concept's logit, and the label head
reads ``p c+ + (1 - p) c-`` for every concept, with ``p`` the concept probability. Setting ``p`` (an intervention)
moves the embedding to the "present" or "absent" end.

Continuous concepts (an extension; the paper treats binary ones): the score is the concept's z-score (its value in
its unit after normalisation) and the mixing weight is ``sigmoid(z)``, so the embedding slides from ``c-`` (small) to
``c+`` (large); an intervention sets ``z`` from the value given in the unit.

Random training-time interventions (RandInt): while the model is in training mode, ``loss_terms`` recomputes the
label with each annotated concept of each sample replaced by its true value with probability
``intervention_probability`` (drawn per sample and concept), so the head learns to use corrected concepts.
``forward`` itself never intervenes at random, so evaluation outputs do not depend on it.

Localization: the embeddings are pooled after their non-linearity, so each location has its own ``c+`` and ``c-``
and the class logit is exactly the mean over locations of ``W (p c+(s) + (1 - p) c-(s))`` plus the bias; that
per-location term, clamped at 0, upsampled and scaled to [0, 1], is the localization. The scoring function is
linear too, so each concept's raw value is the mean over locations of its score of ``c+(s)`` and ``c-(s)`` (bias
excluded) plus the bias: those per-location scores are the ``concept_maps``. With ``mask_guidance=True`` the loss
adds a ``mask_guidance`` term asking each present binary finding's map (and each measurement
``mask_guided_concepts`` names) to peak on the lesion mask (:mod:`pellucid.models.concept_guidance`).

Keys of ``ModelOutput.aux`` (what the loss needs to recompute the label under RandInt; not part of the explanation):

- ``positive_embeddings``: (B, M, E) pooled ``c+`` of every concept.
- ``negative_embeddings``: (B, M, E) pooled ``c-`` of every concept.

Explanation protocol: the label head is linear over the mixed embeddings ``p c+ + (1 - p) c-`` (flattened, M * E
entries), which :meth:`ConceptEmbeddingModel.explanation_head` recomputes from these two ``aux`` entries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from pellucid.models.backbones import create_backbone
from pellucid.models.base import InterpretableModel, classification_loss
from pellucid.models.concept_guidance import concept_map_guidance_loss, guided_concept_mask, guided_pairs
from pellucid.models.concept_layers import ConceptBank, evidence_to_localization, resolve_concepts, takes_concepts
from pellucid.models.concepts import ConceptSpec
from pellucid.models.explanation import LinearExplanationHead
from pellucid.models.output import ModelOutput
from pellucid.models.registry import register_model


class ConceptEmbeddingModel(InterpretableModel):
    """Backbone -> per-location positive/negative concept embeddings -> concept scores -> mixed embeddings -> label.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Classes ``K``.
        concepts: Concept specifications (column order of the batch's ``concepts``); ``None`` uses
            :data:`~pellucid.models.concept_layers.DEFAULT_CONCEPTS`.
        backbone: Backbone name (see :mod:`pellucid.models.backbones`).
        backbone_kwargs: Extra arguments for the backbone.
        embedding_size: Size ``E`` of each concept embedding.
        intervention_probability: RandInt probability of replacing a concept by its true value while training.
        balanced_concept_loss: Class-balanced BCE for binary concepts.
        normalizer_samples: Annotated values per concept used to estimate the normalisation statistics.
        mask_guidance: Add the ``mask_guidance`` loss term (concept maps of present findings on the lesion mask;
            batches without ``mask`` contribute 0).
        mask_guidance_temperature: Temperature of that term's spatial softmax.
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
        embedding_size: int = 16,
        intervention_probability: float = 0.25,
        balanced_concept_loss: bool = True,
        normalizer_samples: int = 2048,
        mask_guidance: bool = False,
        mask_guidance_temperature: float = 1.0,
        mask_guided_concepts: Sequence[str] | None = None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_classes)
        if mask_guidance_temperature <= 0:
            raise ValueError(f"cem: mask_guidance_temperature must be > 0, got {mask_guidance_temperature!r}")
        if embedding_size < 1:
            raise ValueError(f"cem: embedding_size must be >= 1, got {embedding_size!r}")
        if not 0.0 <= intervention_probability <= 1.0:
            raise ValueError(f"cem: intervention_probability must be in [0, 1], got {intervention_probability!r}")
        specs = resolve_concepts(concepts)
        guided_concepts = guided_concept_mask("cem", mask_guided_concepts, specs)
        count = len(specs)
        self.backbone = create_backbone(backbone, spatial_dims, in_channels, **(backbone_kwargs or {}))
        # One 1x1 convolution = an independent linear context generator per concept and sign, at every location.
        self.context_generator = Conv[Conv.CONV, spatial_dims](self.backbone.out_channels, count * 2 * embedding_size,
                                                               kernel_size=1)
        self.scorer_weight = nn.Parameter(torch.randn(count, 2 * embedding_size) / (2 * embedding_size) ** 0.5)
        self.scorer_bias = nn.Parameter(torch.zeros(count))
        self.concept_bank = ConceptBank(specs, max_count=normalizer_samples)
        self.label_head = nn.Linear(count * embedding_size, num_classes)
        self.embedding_size = embedding_size
        self.intervention_probability = intervention_probability
        self.balanced_concept_loss = balanced_concept_loss
        self.mask_guidance = mask_guidance
        self.mask_guidance_temperature = mask_guidance_temperature
        self.mask_guided_concepts = list(mask_guided_concepts) if mask_guided_concepts is not None else None
        self.register_buffer("mask_guided", guided_concepts, persistent=False)  # (M,) the guided concepts

    @property
    def concept_specs(self) -> list[ConceptSpec]:
        """The concepts the model predicts, in column order."""
        return self.concept_bank.concept_specs

    def forward_embeddings(self, image: Tensor) -> Tensor:
        """(B, C, *S) image -> (B, M, 2, E, *s) positive (index 0) and negative (1) embeddings at every location."""
        contexts = F.leaky_relu(self.context_generator(self.backbone(image)))
        return contexts.view(contexts.shape[0], self.concept_bank.num_concepts, 2, self.embedding_size,
                             *contexts.shape[2:])

    def score(self, positive: Tensor, negative: Tensor) -> Tensor:
        """(B, M, E) embeddings -> (B, M) raw concept values (logits for binary, z-scores for continuous)."""
        return torch.einsum("bmj,mj->bm", torch.cat([positive, negative], dim=2), self.scorer_weight) + self.scorer_bias

    def score_maps(self, embedding_maps: Tensor) -> Tensor:
        """(B, M, 2, E, *s) embeddings -> (B, M, *s) per-location scores without bias (their mean + bias = raw)."""
        weight = self.scorer_weight.view(self.scorer_weight.shape[0], 2, self.embedding_size)
        return torch.einsum("bmje...,mje->bm...", embedding_maps, weight)

    def mixing_weight(self, raw: Tensor) -> Tensor:
        """(B, M) raw -> the weight of ``c+``: the probability (binary) or ``sigmoid`` of the z-score (continuous)."""
        return torch.sigmoid(raw)

    def head(self, positive: Tensor, negative: Tensor, mixing: Tensor) -> Tensor:
        """Mix (B, M, E) embeddings with (B, M) weights and return (B, K) logits."""
        embedding = mixing.unsqueeze(2) * positive + (1 - mixing.unsqueeze(2)) * negative
        return self.label_head(embedding.flatten(1))

    def forward(
        self,
        image: Tensor,
        *,
        explain: bool = True,
        concept_mask: Tensor | None = None,
        concept_values: Tensor | None = None,
    ) -> ModelOutput:
        """Predict concepts and the label from their mixed embeddings; optionally with concepts set by the caller.

        Args:
            image: (B, C, *S) float tensor.
            explain: Also compute the class localization.
            concept_mask: (B, M) bool, which concepts to set.
            concept_values: (B, M) values in the concepts' units for the set concepts (0/1 or a probability for
                binary concepts); ignored (may be NaN) where ``concept_mask`` is False.
        """
        self.check_input(image)
        intervention = self.concept_bank.check_intervention(concept_mask, concept_values, image.shape[0])
        embedding_maps = self.forward_embeddings(image)
        pooled = embedding_maps.flatten(4).mean(dim=4)
        positive, negative = pooled[:, :, 0], pooled[:, :, 1]
        raw, _ = self.concept_bank.intervene(self.score(positive, negative), intervention)
        mixing = self.mixing_weight(raw)
        if intervention is not None:  # exact values for set binary concepts (sigmoid(logit(v)) only approximates v)
            mask, values = intervention
            mixing = torch.where(mask & self.concept_bank.is_binary, values, mixing)
        logits = self.head(positive, negative, mixing)
        localization = None
        if explain:
            weight = mixing.view(*mixing.shape, 1, *([1] * self.spatial_dims))
            mixed_maps = weight * embedding_maps[:, :, 0] + (1 - weight) * embedding_maps[:, :, 1]
            head_weight = self.label_head.weight.view(self.num_classes, *mixing.shape[1:], self.embedding_size)
            class_evidence = torch.einsum("kme,bme...->bk...", head_weight, mixed_maps)
            localization = evidence_to_localization(class_evidence, image.shape[2:])
        return ModelOutput(logits=logits, localization=localization, concept_logits=self.concept_bank.raw_to_unit(raw),
                           concept_maps=self.score_maps(embedding_maps),
                           aux={"positive_embeddings": positive, "negative_embeddings": negative})

    def explanation_head(self) -> LinearExplanationHead:
        """The label head over the mixed concept embeddings ``p c+ + (1 - p) c-`` (M * E entries, concept-major).

        The embeddings come from ``aux`` and ``p`` from ``concept_logits`` (as ``forward`` mixes them without
        intervention), so no extra forward pass is needed.
        """
        def mixed_embeddings(_image: Tensor, output: ModelOutput) -> Tensor:
            mixing = self.mixing_weight(self.concept_bank.logits_to_raw(output.concept_logits)).unsqueeze(2)
            positive, negative = output.aux["positive_embeddings"], output.aux["negative_embeddings"]
            return (mixing * positive + (1 - mixing) * negative).flatten(1)

        names = [f"{spec.name}[{index}]" for spec in self.concept_specs for index in range(self.embedding_size)]
        return LinearExplanationHead("mixed concept embeddings", self.label_head.weight, self.label_head.bias,
                                     mixed_embeddings, names)

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """``classification`` (with RandInt while training), ``concept`` and, when on, ``mask_guidance``."""
        positive, negative = output.aux.get("positive_embeddings"), output.aux.get("negative_embeddings")
        if positive is None or negative is None:
            raise TypeError("cem.loss_terms: expected aux['positive_embeddings'] and aux['negative_embeddings'] "
                            f"from this model's forward, got aux keys {sorted(output.aux)}; pass the ModelOutput it "
                            "returned")
        targets = self.concept_bank.targets(batch, output.logits.shape[0])
        if self.training:  # first, so the very first batch is already compared on the normalised scale
            self.concept_bank.update(targets)
        raw = self.concept_bank.logits_to_raw(output.concept_logits)
        logits = output.logits
        if self.training and self.intervention_probability > 0:
            annotated = ~torch.isnan(targets)
            drawn = torch.rand(targets.shape, device=targets.device) < self.intervention_probability
            true_mixing = torch.where(self.concept_bank.is_binary, torch.nan_to_num(targets).clamp(0, 1),
                                      torch.sigmoid(self.concept_bank.unit_to_raw(torch.nan_to_num(targets))))
            mixing = torch.where(drawn & annotated, true_mixing, self.mixing_weight(raw))
            logits = self.head(positive, negative, mixing)
        terms = {
            "classification": classification_loss(logits, batch["label"]),
            "concept": self.concept_bank.loss(raw, targets, balanced=self.balanced_concept_loss),
        }
        if self.mask_guidance:
            mask = batch.get("mask")
            if mask is None or output.concept_maps is None:
                terms["mask_guidance"] = logits.sum() * 0.0
            else:
                guided = guided_pairs(targets, mask, self.concept_bank, self.mask_guided)
                terms["mask_guidance"] = concept_map_guidance_loss(output.concept_maps, mask, guided,
                                                                   self.mask_guidance_temperature)
        return terms

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``concept_encoder`` (backbone, context generators, scorers) and ``label_head``."""
        encoder = [p for name, p in self.named_parameters() if not name.startswith("label_head.")]
        return {"concept_encoder": encoder, "label_head": list(self.label_head.parameters())}


def _create_cem(spatial_dims: int, **kwargs: Any) -> ConceptEmbeddingModel:
    return ConceptEmbeddingModel(spatial_dims, **kwargs)


@register_model(expected_parameters={2: 99_861, 3: 289_365})
@takes_concepts
def cem(spatial_dims: int, concepts: list[ConceptSpec] | None = None, **kwargs: Any) -> ConceptEmbeddingModel:
    """Concept embedding model with random training-time interventions (2D and 3D)."""
    return _create_cem(spatial_dims, **{"concepts": concepts, **kwargs})
