"""Attention-gated classifier: grid attention gates pick where each feature level is read from.

Schlemper et al., "Attention gated networks: Learning to leverage salient regions in medical images", Medical
Image Analysis 53, 2019, https://arxiv.org/abs/1808.08114. A MONAI residual encoder; grid attention gates
(:mod:`pellucid.models.attention_gates`) on feature levels, each gated by the coarsest features; every gated
level is pooled with its attention weights into a vector, and a linear head aggregates the vectors
(``concat``, ``mean`` or ``deep_supervision``, as in the paper).

Because the head is linear in attention-weighted averages, each logit splits exactly into per-location
contributions (:meth:`AttentionClassifier.class_evidence`); ``localization`` shows where that evidence lies.

Keys of ``ModelOutput.aux`` (loss-only): ``gate_logits``: (B, G, K) the logits of each gate's own head, gates in
``attention`` order; only with ``aggregation="deep_supervision"``. ``class_evidence``: (B, K, *s) the summed class
evidence of every path at the finest gated level's resolution; only in training mode with ``mask_guidance``.

Explanation protocol: the head is linear over the concatenated path vectors (attention-pooled gated levels, then the
global average if enabled); :meth:`AttentionClassifier.explanation_head` returns it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import inf, prod
from typing import Any

import torch
from torch import Tensor, nn

from pellucid.models.attention_gates import GridAttentionGate, ResidualEncoder, gate_sparsity_loss
from pellucid.models.base import InterpretableModel, classification_loss
from pellucid.models.explanation import LinearExplanationHead
from pellucid.models.maps import resize_maps
from pellucid.models.output import ModelOutput
from pellucid.models.prototype_losses import mask_guidance_loss
from pellucid.models.registry import register_model

AGGREGATIONS = ("concat", "mean", "deep_supervision")


def pooling_weights(coefficients: Tensor, normalize: bool) -> Tensor:
    """Per-location pooling weights (B, 1, *s) from gate coefficients.

    ``normalize``: ``alpha / sum(alpha)`` (an attention-weighted mean); else ``alpha / N`` (the mean of the gated
    features over all ``N`` locations, so a closed gate removes evidence instead of re-weighting it).
    """
    if normalize:
        total = coefficients.flatten(2).sum(dim=2).clamp_min(1e-6)
        return coefficients / total.view(-1, 1, *[1] * (coefficients.ndim - 2))
    return coefficients / prod(coefficients.shape[2:])


def attention_pool(features: Tensor, coefficients: Tensor, normalize: bool) -> Tensor:
    """Pool (B, C, *s) features with (B, 1, *s) gate coefficients into (B, C) (see :func:`pooling_weights`)."""
    return (features * pooling_weights(coefficients, normalize)).flatten(2).sum(dim=2)


class AttentionClassifier(InterpretableModel):
    """Classifier whose evidence passes through attention gates (all of it, unless ``global_pooling`` adds a path).

    Paths: one per gated level (``gate_levels``, encoder stages; the coarsest stage may be gated too, by itself),
    plus, with ``global_pooling``, the plain average of the coarsest features (the paper's extra path). Each gated
    level ``l`` gives ``v_l = sum_s a_l(s) x_l(s)`` with ``a_l = alpha_l / sum_s alpha_l`` (or ``alpha_l / N``, see
    ``normalize_attention``).

    Aggregation: ``concat``: one linear head on the concatenated path vectors. ``mean``: one linear head per path,
    logits averaged. ``deep_supervision``: the ``concat`` head gives the logits, and each gate's own linear head
    adds a loss term ``deep_supervision_<i>`` (``i`` = the gate's index in ``attention``).

    Outputs: ``logits`` (B, K); ``attention``: one (B, 1, *s_l) coefficient map per gate, coarse to fine;
    ``localization`` (B, K, *S): for each class, the sum over paths of each location's contribution to the logit
    (:meth:`class_evidence`), resized to the input (bi/trilinear, scaled so each map keeps its total), negative
    evidence set to 0, and divided by its maximum, so each class map is in [0, 1] (all 0 when nothing speaks
    for the class).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Classes ``K``.
        channels: Channels of each encoder stage, finest first.
        strides: Stride of each encoder stage.
        gate_levels: Encoder stages that are gated (indices into ``channels``); ``None`` = every stage but the
            coarsest.
        gate_subsample: Subsampling of each gate's ``theta`` (1 = coefficients at the level's own resolution).
        aggregation: ``"concat"``, ``"mean"`` or ``"deep_supervision"``.
        global_pooling: Add the coarsest stage's plain average as a path (not gated).
        normalize_attention: Pool each gated level with ``alpha / sum(alpha)`` (the paper's attention-weighted mean)
            or, by default, ``alpha / N``: then only an open gate lets evidence through. In a seed sweep on the 2D
            phantom benchmark the coarser gate's pointing game was 0.99-1.0 in every run this way, 0.63-0.95
            with the weighted mean.
        gate_sparsity: Add the ``gate_sparsity`` loss term, the mean gate coefficient (weigh it with the module's
            ``loss_weights``); meaningful with ``normalize_attention=False``, where closing a gate changes the
            pooled vector.
        mask_guidance: Add the ``mask_guidance`` loss term: the off-lesion share of a spatial softmax of the true
            class's evidence (:func:`~pellucid.models.prototype_losses.mask_guidance_loss`), so the map a user sees
            (not only the gates) puts its peak on the lesion; batches without ``mask`` contribute 0.
        mask_guidance_temperature: Temperature of that softmax.
        dropout: Dropout on the path vectors before the heads.
        norm: MONAI norm name.
        act: MONAI activation name.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64),
        strides: Sequence[int] = (2, 2, 2),
        gate_levels: Sequence[int] | None = None,
        gate_subsample: int = 1,
        aggregation: str = "concat",
        global_pooling: bool = False,
        normalize_attention: bool = False,
        gate_sparsity: bool = False,
        mask_guidance: bool = False,
        mask_guidance_temperature: float = 1.0,
        dropout: float = 0.0,
        norm: str = "batch",
        act: str = "relu",
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_classes)
        if mask_guidance_temperature <= 0:
            raise ValueError(f"attention_classifier: mask_guidance_temperature must be > 0, got "
                             f"{mask_guidance_temperature!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"attention_classifier: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        levels = list(range(len(channels) - 1)) if gate_levels is None else sorted(set(gate_levels))
        if not levels or any(not 0 <= level < len(channels) for level in levels):
            raise ValueError(f"attention_classifier: gate_levels must be a non-empty subset of 0..{len(channels) - 1} "
                             f"(encoder stages), got {gate_levels!r}")
        self.encoder = ResidualEncoder(spatial_dims, in_channels, channels, strides, norm=norm, act=act)
        self.gate_levels = tuple(reversed(levels))  # coarse to fine: the order of ``attention``
        self.gates = nn.ModuleList(
            GridAttentionGate(spatial_dims, channels[level], channels[-1], subsample=gate_subsample)
            for level in self.gate_levels
        )
        self.global_pooling = global_pooling
        self.normalize_attention = normalize_attention
        self.gate_sparsity = gate_sparsity
        self.mask_guidance = mask_guidance
        self.mask_guidance_temperature = mask_guidance_temperature
        self.aggregation = aggregation
        self.path_channels = [channels[level] for level in self.gate_levels]
        if global_pooling:
            self.path_channels.append(channels[-1])
        self.dropout = nn.Dropout(dropout)
        if aggregation == "mean":
            self.path_heads = nn.ModuleList(nn.Linear(width, num_classes) for width in self.path_channels)
        else:
            self.classifier = nn.Linear(sum(self.path_channels), num_classes)
        if aggregation == "deep_supervision":
            self.gate_heads = nn.ModuleList(nn.Linear(channels[level], num_classes) for level in self.gate_levels)

    # ------------------------------------------------------------------------------------------- seams
    def forward_features(self, image: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Encode and gate: (features of each gated level, their coefficients, the coarsest features).

        Lists follow ``attention`` order (coarse to fine).
        """
        stages = self.encoder(image)
        coarsest = stages[-1]
        features, coefficients = [], []
        for level, gate in zip(self.gate_levels, self.gates, strict=True):
            features.append(stages[level])
            coefficients.append(gate.coefficients(stages[level], coarsest))  # the gated product is never read
        return features, coefficients, coarsest

    def path_vectors(self, features: list[Tensor], coefficients: list[Tensor], coarsest: Tensor) -> list[Tensor]:
        """(B, C_p) vector of every path: attention-pooled gated levels, then the global average if enabled."""
        vectors = [attention_pool(x, alpha, self.normalize_attention)
                   for x, alpha in zip(features, coefficients, strict=True)]
        if self.global_pooling:
            vectors.append(coarsest.flatten(2).mean(dim=2))
        return vectors

    def forward_head(self, vectors: list[Tensor]) -> Tensor:
        """Aggregate the path vectors into (B, K) logits."""
        vectors = [self.dropout(v) for v in vectors]
        if self.aggregation == "mean":
            return torch.stack([head(v) for head, v in zip(self.path_heads, vectors, strict=True)]).mean(dim=0)
        return self.classifier(torch.cat(vectors, dim=1))

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:
        """Classify; ``explain`` adds the class ``localization`` (the gate maps are always returned)."""
        self.check_input(image)
        features, coefficients, coarsest = self.forward_features(image)
        vectors = self.path_vectors(features, coefficients, coarsest)
        logits = self.forward_head(vectors)
        aux = {}
        if self.aggregation == "deep_supervision":
            gated_vectors = vectors[: len(self.gates)]
            aux["gate_logits"] = torch.stack([head(self.dropout(v)) for head, v in
                                              zip(self.gate_heads, gated_vectors, strict=True)], dim=1)
        if self.mask_guidance and self.training:
            evidence, _ = self.evidence_maps(features, coefficients, coarsest)
            aux["class_evidence"] = self.combine_at(evidence, features[-1].shape[2:])
        localization = None
        if explain:  # a map to show and score, detached: no loss reads it, so autograd records none of it
            with torch.no_grad():
                evidence, _ = self.evidence_maps(features, coefficients, coarsest)
                localization = self.localize(evidence, image.shape[2:])
        return ModelOutput(logits=logits, attention=tuple(coefficients), localization=localization, aux=aux)

    # ------------------------------------------------------------------------------------- explanation
    def _path_weights(self) -> tuple[list[Tensor], Tensor]:
        """Linear weights (K, C_p) each path's vector meets in the logits, and the logits' bias (K,)."""
        if self.aggregation == "mean":
            share = 1.0 / len(self.path_heads)
            weights = [share * head.weight for head in self.path_heads]
            return weights, share * torch.stack([head.bias for head in self.path_heads]).sum(dim=0)
        return list(self.classifier.weight.split(self.path_channels, dim=1)), self.classifier.bias

    def evidence_maps(self, features: list[Tensor], coefficients: list[Tensor],
                      coarsest: Tensor) -> tuple[list[Tensor], Tensor]:
        """Each path's contribution to each logit at each of its locations, and the bias.

        Returns:
            ``(maps, bias)``: one (B, K, *s_p) map per path (gates coarse to fine, then the global path) and the
            (K,) bias, such that in eval mode ``logits = sum_p maps[p].sum(spatial) + bias`` exactly.
        """
        weights, bias = self._path_weights()
        sources = [(x, pooling_weights(alpha, self.normalize_attention))
                   for x, alpha in zip(features, coefficients, strict=True)]
        if self.global_pooling:
            sources.append((coarsest, torch.full_like(coarsest[:, :1], 1.0 / prod(coarsest.shape[2:]))))
        # in place on the product's own result (its backward reads only the weight and the features)
        maps = [torch.einsum("kc,bc...->bk...", weight, x).mul_(share)
                for weight, (x, share) in zip(weights, sources, strict=True)]
        return maps, bias

    def class_evidence(self, image: Tensor) -> tuple[list[Tensor], Tensor]:
        """Per-path, per-location logit contributions of ``image`` (see :meth:`evidence_maps`)."""
        self.check_input(image)
        return self.evidence_maps(*self.forward_features(image))

    def explanation_head(self) -> LinearExplanationHead:
        """The linear head over the concatenated path vectors, recomputed from the image (exact in eval mode).

        With ``aggregation="mean"`` the per-path heads are averaged into one linear map over the same vector.
        """
        weights, bias = self._path_weights()

        def path_vector(image: Tensor, _output: ModelOutput) -> Tensor:
            return torch.cat(self.path_vectors(*self.forward_features(image)), dim=1)

        return LinearExplanationHead("attention-pooled path vectors", torch.cat(weights, dim=1), bias, path_vector)

    @staticmethod
    def combine_at(evidence: list[Tensor], size: Sequence[int]) -> Tensor:
        """Sum per-path evidence maps resized to ``size``, each scaled so its total is kept (differentiable)."""
        total = prod(size)
        return sum(resize_maps(path, size) * (prod(path.shape[2:]) / total) for path in evidence)

    @staticmethod
    def localize(evidence: list[Tensor], size: Sequence[int]) -> Tensor:
        """(B, K, *S) class maps in [0, 1] from per-path evidence maps (see the class docstring), detached.

        Every full-size step after the resizing works in place on the resized maps (never on ``evidence``).
        """
        if not evidence:
            raise ValueError("attention_classifier.localize: no evidence maps given (expected one per path)")
        total_voxels = prod(size)
        with torch.no_grad():
            combined: Tensor | None = None
            for path_evidence in evidence:
                resized = resize_maps(path_evidence, size)
                share = prod(path_evidence.shape[2:]) / total_voxels
                # resize_maps returns a float32 map already at the input size itself: scale a copy of that one
                resized = resized * share if resized is path_evidence else resized.mul_(share)
                combined = resized if combined is None else combined.add_(resized)
            positive = combined.clamp_min_(0.0)
            peak = positive.flatten(2).amax(dim=2).view(*positive.shape[:2], *[1] * len(size))
            # dividing by inf keeps a map without evidence at 0 without a full-size torch.where; no clamp to [0, 1]
            # needed: 0 <= value <= peak, and correctly rounded division is monotonic with peak / peak = 1
            return positive.div_(torch.where(peak > 0, peak, torch.full_like(peak, inf)))

    # --------------------------------------------------------------------------------- training seams
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone`` (encoder), ``gates`` and ``head`` (every linear head)."""
        head = [p for name, p in self.named_parameters() if name.split(".")[0] in ("classifier", "path_heads",
                                                                                   "gate_heads")]
        return {"backbone": list(self.encoder.parameters()), "gates": list(self.gates.parameters()), "head": head}

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``classification``; ``deep_supervision_<i>`` per gate head; ``gate_sparsity``, ``mask_guidance`` (opt-in)."""
        if output.logits is None:
            raise ValueError(f"{self.name}: output has no logits to compute the loss from")
        terms = {"classification": classification_loss(output.logits, batch["label"])}
        if self.aggregation == "deep_supervision":
            gate_logits = output.aux.get("gate_logits")
            if gate_logits is None:
                raise ValueError(f"{self.name}: deep supervision needs the gate heads' logits in aux['gate_logits']; "
                                 "pass the ModelOutput this model returned")
            for index, logits in enumerate(gate_logits.unbind(dim=1)):
                terms[f"deep_supervision_{index}"] = classification_loss(logits, batch["label"])
        if self.gate_sparsity:
            terms["gate_sparsity"] = gate_sparsity_loss(self.name, output.attention)
        if self.mask_guidance:
            terms["mask_guidance"] = self._mask_guidance_term(output, batch)
        return terms

    def _mask_guidance_term(self, output: ModelOutput, batch: Mapping[str, Tensor]) -> Tensor:
        """Off-lesion share of the true class's evidence (0, in the graph, without ``mask`` or outside training)."""
        evidence, mask = output.aux.get("class_evidence"), batch.get("mask")
        if evidence is None or mask is None:
            return output.logits.sum() * 0.0
        label = batch["label"].long()
        if label.ndim != 1:
            raise ValueError(f"{self.name}: mask_guidance needs one class index per sample (B,), got labels of shape "
                             f"{tuple(label.shape)}")
        true_class = evidence[torch.arange(evidence.shape[0], device=evidence.device), label].unsqueeze(1)
        own = torch.ones(true_class.shape[:2], dtype=torch.bool, device=true_class.device)
        return mask_guidance_loss(true_class.float(), mask, own, self.mask_guidance_temperature)


def _create_attention_classifier(spatial_dims: int, **kwargs: Any) -> AttentionClassifier:
    return AttentionClassifier(spatial_dims, **kwargs)


@register_model(expected_parameters={2: 97_909, 3: 287_413})
def attention_classifier(spatial_dims: int, **kwargs: Any) -> AttentionClassifier:
    """Attention-gated classifier (Schlemper et al. 2019) with class evidence maps (2D and 3D)."""
    return _create_attention_classifier(spatial_dims, **kwargs)
