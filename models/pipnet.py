"""PIP-Net: patch-based intuitive prototypes, a sparse non-negative scoring sheet, and abstention (2D and 3D).

Nauta, Schlötterer, van Keulen, Seifert, "PIP-Net: Patch-Based Intuitive Prototypes for Interpretable Image
Classification", CVPR 2023. Backbone (any of :mod:`pellucid.models.backbones`) -> 1x1 convolution to ``P`` channels
(cosine, see below) -> softmax over the prototypes at every latent patch (a patch's *presence* of each prototype; they
sum to 1 per patch) -> max over locations (image-level presence, (B, P)) -> presences below ``presence_threshold`` set
to 0 -> scoring sheet: ``scores = presence @ relu(W).T``, ``W`` (K, P), no bias. Prototypes are shared by the classes;
the scoring sheet says how much each one counts for each class.

Choices where the paper or its code leaves room (each a documented option):

- **Cosine presence logits**: the 1x1 convolution reads L2-normalised latent patches with L2-normalised prototype
  vectors (no bias), times ``presence_scale``, before the softmax. The paper's convolution is unconstrained; trained
  from scratch on the phantom its logits grew until the softmax saturated (presences within 1e-6 of 0 or 1), no
  gradient reached the features, and the classification phase stayed at chance (bounded logits: 0.74 validation
  accuracy after the same 250 steps, ``docs/benchmarks/pipnet.md``).
- **Non-negative weights by construction**: the scoring sheet stores an unconstrained parameter and uses its ReLU in
  every forward pass, so the weights the model computes with are >= 0 after every optimizer step, whatever the
  optimizer, without a clamp to forget (the public code subtracts 1e-3 from every weight at every step in the clamp
  itself, PIPNet#3). A weight that reaches 0 stays 0 (ReLU has no gradient there): the ``sparsity`` term (L1 of the
  weights) drives irrelevant weights to exactly 0.
- **Presences below ``presence_threshold`` (0.1) count as absent** in training and evaluation alike (the public code
  ignores them at inference only), so the model trained is the model explained.
- **Abstention** (``aux["abstained"]``, :meth:`PIPNet.abstentions`): the model abstains on an image in which no
  prototype that carries weight is present at ``presence_threshold`` or more (all scores 0: equal logits, empty class
  evidence), and on one whose top score is below its predicted class's *abstention threshold*: the paper's
  out-of-distribution rule (section 5.4 of the paper: a class's threshold is a low percentile of its training images'
  scores). The thresholds are set after training from the scores of the training images predicted as each class
  (:meth:`PIPNet.calibrate_abstention`, the ``abstention_quantile``; the push callback calls it at the end of the fit)
  and kept in the buffer ``abstention_thresholds`` (0 before calibration: only the first rule applies). Abstaining
  changes no logit: the prediction stays available beside the flag.
- **Logits** are the scores themselves (linear in the presences, so the explanation head rebuilds them exactly); the
  classification loss reads them through the paper's ``log(1 + score^2)``.
- **Two views inside the model**: in training mode ``forward`` draws two altered copies of the batch
  (:func:`~pellucid.models.pipnet_losses.training_view`: intensity and noise; the first stays in place, so masks fit
  it); the second is also shifted by up to ``view_shift`` pixels, mirrored and moved by up to ``view_cells`` whole
  latent cells (:func:`~pellucid.models.pipnet_losses.geometric_view`), and its presences are mapped back before the
  alignment loss compares them. The paper aligns two crops that differ by less than a cell; trained from scratch on
  the phantom, that let the presences encode the position in the frame (zero padding makes it easy), on which such
  views agree trivially, and the scoring sheet then had nothing to read. The output describes the first view; in eval
  mode the image is used as it is.
- **Prototype classes** (:meth:`PIPNet.prototype_classes`): the class a prototype weighs most for; ``-1`` for a
  prototype with no positive weight (it takes part in no decision, and its maps are shown as zero).
- **Sources** (:meth:`PIPNet.prototype_provenance`): the training patch where each prototype is most present, found
  after training by the push callback without changing any prototype (:meth:`PIPNet.record_prototype_sources`: when
  the recipe's last phase starts and again after the last training step, with the abstention thresholds).

- **Mask guidance** (``mask_guidance``, off by default; not in the paper): on scans whose ``mask`` marks a lesion, the
  true class's evidence map (``sum_p W[y, p] * presence_p``) is penalised for the share of its spatial softmax that
  lies off the lesion (:func:`~pellucid.models.prototype_losses.mask_guidance_loss`, as ProtoPNet's guidance). The
  classification only reads max-pooled presences, so nothing else ties a presence peak to the lesion: unguided on the
  phantom, the lesion prototypes peaked about a cell beside the lesion (pointing game 0.02).

- **Patch balance** (``patch_balance``, a weight, 0 = off by default; not in the paper): the share of the batch's
  latent patches the most present prototype holds beyond ``patch_balance_cap``
  (:func:`~pellucid.models.pipnet_losses.patch_share_excess_loss`), with that weight in the pretraining and joint
  phases, so that no prototype takes nearly every patch (air and tissue alike), which leaves a normal scan
  indistinguishable from a blank image; a run in which no prototype exceeds the cap trains as without it.

Loss terms (unweighted; the recipe weights them): ``classification``, ``alignment``, ``uniformity`` (tanh),
``sparsity`` (sum of the scoring-sheet weights), ``mask_guidance`` and ``patch_balance`` when enabled; see
:mod:`pellucid.models.pipnet_losses`.

Keys of ``ModelOutput.aux``: ``presence_maps`` (B, V, P, *s) every view's presence maps before thresholding, the second
view's mapped back onto the first view's patches (V = 2 in training mode, else 1); ``alignment_mask`` (B, *s) the
patches both views show; ``view_logits`` (B, V, K) every view's scores; ``abstained`` (B,) bool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from pellucid.models.backbones import create_backbone
from pellucid.models.base import InterpretableModel
from pellucid.models.explanation import LinearExplanationHead
from pellucid.models.gradcam import normalize_per_map
from pellucid.models.maps import check_interpolation, upsample_evidence
from pellucid.models.output import ModelOutput
from pellucid.models.pipnet_losses import (
    alignment_loss,
    geometric_view,
    patch_share_excess_loss,
    scoring_classification_loss,
    tanh_uniformity_loss,
    training_view,
    undo_geometry,
)
from pellucid.models.prototype_losses import MASK_GUIDANCE_RESOLUTIONS, mask_guidance_loss
from pellucid.models.recipe import Phase, PushOptions, Recipe
from pellucid.models.registry import register_model

_EXTRA_STATE_VERSION = 1


class PrototypeSources(nn.Module):
    """The training patch each prototype was found most present in, as plain values kept in the extra state.

    Args:
        count: Number of prototypes ``P``.
    """

    def __init__(self, count: int) -> None:
        super().__init__()
        self.entries: list[dict[str, Any] | None] = [None] * count

    def get_extra_state(self) -> dict[str, Any]:
        """The entries (saved in ``state_dict``, checkpoints and bundle metadata)."""
        return {"version": _EXTRA_STATE_VERSION, "sources": [None if e is None else dict(e) for e in self.entries]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` saved."""
        sources = state.get("sources") if isinstance(state, Mapping) else None
        if not isinstance(sources, list) or len(sources) != len(self.entries):
            found = f"{len(sources)} sources" if isinstance(sources, list) else type(sources).__name__
            raise ValueError(f"pipnet prototype sources: expected {len(self.entries)} sources, got {found}")
        self.entries = [None if e is None else dict(e) for e in sources]


class PIPNet(InterpretableModel):
    """PIP-Net: softmax patch presences of shared prototypes, max-pooled, read by a non-negative scoring sheet.

    Outputs ``logits`` (B, K) (the scores), ``prototype_similarity`` (B, P) (presence after thresholding, 0 for
    prototypes without weight), ``prototype_maps`` (B, P, *s) (the presence maps of those prototypes), and, when
    explained, ``localization`` (B, K, *S): ``sum_p W[k, p] * map_p`` upsampled and scaled to [0, 1] per map.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        num_classes: Classes ``K``.
        backbone: Backbone name (see :mod:`pellucid.models.backbones`).
        backbone_kwargs: Extra arguments for the backbone.
        num_prototypes: Prototypes ``P`` (channels of the 1x1 add-on convolution).
        presence_scale: Factor on the cosine logits before the softmax over prototypes (bounds how sharp a presence
            can get: at most ``e^(2s) / (e^(2s) + P - 1)``).
        presence_threshold: Image-level presences below this count as absent (0 in the scores); an image with no
            weighted prototype at or above it is abstained on (PIP-Net's 0.1).
        abstention_quantile: Share of the training images of each predicted class whose top score falls below that
            class's abstention threshold (the paper uses 0.05; 0: no thresholds, abstain only without evidence).
        score_exponent: The power in the classification loss's ``log(1 + score^exponent)`` (the paper's 2).
        initial_weight: Mean of the scoring sheet's initial weights (standard deviation a tenth of it; paper: 1).
        localization_interpolation: ``"linear"`` or ``"cubic"`` upsampling of the class evidence.
        view_gain: Training views scale intensities by up to this factor either way.
        view_offset: Training views move intensities by up to this much either way.
        view_noise: Standard deviation of the Gaussian noise added to training views.
        view_shift: Training views are shifted by up to this many pixels/voxels per axis.
        view_cells: The second training view is moved by up to this many latent cells per axis (0: not moved).
        view_flips: The second training view is mirrored at random along each axis.
        mask_guidance: Add the ``mask_guidance`` loss term (batches without ``mask`` contribute 0).
        mask_guidance_temperature: Temperature of its spatial softmax (lower: the peak counts more).
        mask_guidance_resolution: ``"feature"`` (cells, by the share of their pixels off the lesion) or ``"input"``
            (the evidence upsampled like ``localization``, against the mask itself).
        patch_balance: Weight of the ``patch_balance`` loss term (every view's presence maps) in the pretraining
            and joint phases; 0 (default): the term is not made.
        patch_balance_cap: Share of the batch's latent patches one prototype may hold before ``patch_balance`` costs.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        num_classes: int = 2,
        backbone: str = "monai/convnet",
        backbone_kwargs: dict[str, Any] | None = None,
        num_prototypes: int = 32,
        presence_scale: float = 10.0,
        presence_threshold: float = 0.1,
        abstention_quantile: float = 0.02,
        score_exponent: float = 2.0,
        initial_weight: float = 1.0,
        localization_interpolation: str = "linear",
        view_gain: float = 0.2,
        view_offset: float = 0.05,
        view_noise: float = 0.02,
        view_shift: int = 2,
        view_cells: int = 1,
        view_flips: bool = True,
        mask_guidance: bool = False,
        mask_guidance_temperature: float = 1.0,
        mask_guidance_resolution: str = "feature",
        patch_balance: float = 0.0,
        patch_balance_cap: float = 0.6,
    ) -> None:
        super().__init__(spatial_dims, in_channels, num_classes)
        if num_prototypes < 2:
            raise ValueError(f"num_prototypes must be >= 2 (a softmax over one prototype is constant), "
                             f"got {num_prototypes!r}")
        if presence_scale <= 0:
            raise ValueError(f"presence_scale must be > 0, got {presence_scale!r}")
        if not 0.0 <= presence_threshold < 1.0:
            raise ValueError(f"presence_threshold must be in [0, 1), got {presence_threshold!r}")
        if not 0.0 <= abstention_quantile < 1.0:
            raise ValueError(f"abstention_quantile must be in [0, 1), got {abstention_quantile!r}")
        if score_exponent < 1.0 or initial_weight <= 0.0:
            raise ValueError(f"score_exponent must be >= 1 and initial_weight > 0, got {score_exponent!r} and "
                             f"{initial_weight!r}")
        if min(view_gain, view_offset, view_noise, view_shift, view_cells) < 0:
            raise ValueError(f"view_gain, view_offset, view_noise, view_shift and view_cells must be >= 0, got "
                             f"{view_gain!r}, {view_offset!r}, {view_noise!r}, {view_shift!r}, {view_cells!r}")
        self.backbone = create_backbone(backbone, spatial_dims, in_channels, **(backbone_kwargs or {}))
        self.add_on = Conv[Conv.CONV, spatial_dims](self.backbone.out_channels, num_prototypes, kernel_size=1,
                                                    bias=False)
        self.presence_scale = float(presence_scale)
        self.scoring_sheet = nn.Parameter(torch.empty(num_classes, num_prototypes))
        nn.init.normal_(self.scoring_sheet, mean=initial_weight, std=initial_weight / 10.0)
        self.sources = PrototypeSources(num_prototypes)
        self.register_buffer("abstention_thresholds", torch.zeros(num_classes))  # set by calibrate_abstention
        self.abstention_quantile = float(abstention_quantile)
        self.num_prototypes = num_prototypes
        self.presence_threshold, self.score_exponent = float(presence_threshold), float(score_exponent)
        self.localization_interpolation = check_interpolation(localization_interpolation, "localization_interpolation")
        self.view_options = {"gain": view_gain, "offset": view_offset, "noise": view_noise, "shift_by": view_shift}
        self.view_cells, self.view_flips = view_cells, view_flips
        if mask_guidance_temperature <= 0 or mask_guidance_resolution not in MASK_GUIDANCE_RESOLUTIONS:
            raise ValueError(f"mask_guidance_temperature must be > 0 and mask_guidance_resolution one of "
                             f"{list(MASK_GUIDANCE_RESOLUTIONS)}, got {mask_guidance_temperature!r} and "
                             f"{mask_guidance_resolution!r}")
        self.mask_guidance, self.mask_guidance_temperature = mask_guidance, float(mask_guidance_temperature)
        self.mask_guidance_resolution = mask_guidance_resolution
        if patch_balance < 0 or not 0.0 < patch_balance_cap <= 1.0:
            raise ValueError(f"patch_balance must be >= 0 and patch_balance_cap in (0, 1], got {patch_balance!r} and "
                             f"{patch_balance_cap!r}")
        self.patch_balance = float(patch_balance)
        self.patch_balance_cap = float(patch_balance_cap)

    # ------------------------------------------------------------------------------------------ forward
    def class_weights(self) -> Tensor:
        """(K, P) the scoring sheet's weights as the model uses them: ``relu`` of the stored parameter, >= 0."""
        return F.relu(self.scoring_sheet)

    def presence_maps(self, image: Tensor) -> Tensor:
        """(B, C, *S) image -> (B, P, *s) presence of every prototype at every latent patch (sums to 1 over ``P``)."""
        features = F.normalize(self.backbone(image), dim=1)
        prototypes = F.normalize(self.add_on.weight.flatten(1), dim=1).to(features.dtype)  # (P, C)
        return torch.softmax(self.presence_scale * torch.einsum("bc...,pc->bp...", features, prototypes), dim=1)

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:
        """Score by prototype presence; in training mode on two altered views (the output describes the first)."""
        self.check_input(image)
        batch = image.shape[0]
        views, geometry = image, None
        if self.training:
            second, *geometry = geometric_view(training_view(image, **self.view_options), self.backbone.stride,
                                               self.view_cells, self.view_flips)
            views = torch.cat([training_view(image, **{**self.view_options, "shift_by": 0}), second])
        presence = self.presence_maps(views)  # (V * B, P, *s)
        pooled = presence.flatten(2).amax(dim=2)
        weights = self.class_weights()
        kept = (pooled >= self.presence_threshold) & (weights > 0).any(dim=0)  # present and weighted
        similarity = pooled * kept
        scores = similarity @ weights.t().to(similarity.dtype)
        count = views.shape[0] // batch
        spread = (1,) * (presence.ndim - 2)
        maps = presence[:batch] * kept[:batch].view(batch, -1, *spread)
        localization = self.class_evidence(maps, tuple(image.shape[2:])) if explain else None
        top = scores[:batch].detach().max(dim=1)
        below = top.values < self.abstention_thresholds.to(top.values.dtype)[top.indices]
        covered = torch.ones_like(presence[:batch, 0], dtype=torch.bool)
        views_maps = [presence[:batch]]
        if geometry is not None:  # the second view's presences on the first view's patches
            second_maps, covered = undo_geometry(presence[batch:], *geometry)
            views_maps.append(second_maps)
        aux = {"presence_maps": torch.stack(views_maps, dim=1), "alignment_mask": covered,
               "view_logits": scores.view(count, batch, -1).transpose(0, 1),
               "abstained": ~kept[:batch].any(dim=1) | below}
        return ModelOutput(logits=scores[:batch], localization=localization, prototype_similarity=similarity[:batch],
                           prototype_maps=maps, aux=aux)

    def class_evidence(self, prototype_maps: Tensor, size: tuple[int, ...]) -> Tensor:
        """(B, P, *s) presence maps -> (B, K, *S): ``sum_p W[k, p] * map_p``, upsampled, scaled to [0, 1] per map."""
        evidence = torch.einsum("kp,bp...->bk...", self.class_weights().to(prototype_maps.dtype), prototype_maps)
        return normalize_per_map(upsample_evidence(evidence, size, self.localization_interpolation))

    # ------------------------------------------------------------------------------------------ training
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone``, ``add_on`` (the prototypes' 1x1 convolution) and ``scoring_sheet``."""
        return {"backbone": list(self.backbone.parameters()), "add_on": list(self.add_on.parameters()),
                "scoring_sheet": [self.scoring_sheet]}

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``classification``, ``alignment``, ``uniformity`` and ``sparsity``, each averaged over the views.

        With one view (eval mode) ``alignment`` compares the view with itself: ``-log sum_p z_p^2``, 0 when every
        patch holds one prototype.

        Raises:
            TypeError: when ``output`` lacks this model's ``aux`` entries.
        """
        maps, view_logits = output.aux.get("presence_maps"), output.aux.get("view_logits")
        if maps is None or view_logits is None or "alignment_mask" not in output.aux:
            raise TypeError(f"{self.name}.loss_terms needs aux['presence_maps'], aux['alignment_mask'] and "
                            f"aux['view_logits'] from this model's forward, got aux keys {sorted(output.aux)}")
        views = range(maps.shape[1])
        label = batch["label"]
        first, second = maps[:, 0], maps[:, -1]
        terms = {
            "classification": sum(scoring_classification_loss(view_logits[:, v], label, self.score_exponent)
                                  for v in views) / len(views),
            "alignment": alignment_loss(first, second, output.aux["alignment_mask"]),
            "uniformity": sum(tanh_uniformity_loss(maps[:, v].flatten(2).amax(dim=2)) for v in views) / len(views),
            "sparsity": self.class_weights().sum(),
        }
        if self.mask_guidance:
            terms["mask_guidance"] = self._mask_guidance_term(first, batch)
        if self.patch_balance:
            terms["patch_balance"] = sum(patch_share_excess_loss(maps[:, v], self.patch_balance_cap)
                                         for v in views) / len(views)
        return terms

    def _mask_guidance_term(self, presence: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Off-lesion share of the true class's evidence on the first view (0, in the graph, without masks)."""
        mask = batch.get("mask")
        if mask is None:
            return presence.sum() * 0.0
        weights = self.class_weights()[batch["label"].long()]  # (B, P): the true class's row of the sheet
        evidence = torch.einsum("bp,bp...->b...", weights.to(presence.dtype), presence).unsqueeze(1)
        own = torch.ones(evidence.shape[:2], dtype=torch.bool, device=evidence.device)
        return mask_guidance_loss(evidence.float(), mask, own, self.mask_guidance_temperature,
                                  self.mask_guidance_resolution, self.localization_interpolation)

    def default_recipe(self) -> Recipe:
        """PIP-Net's protocol: self-supervised pretraining, then everything, then the scoring sheet alone.

        ``pretrain`` trains backbone and add-on on the two-view losses only (scoring sheet frozen), with the paper's
        weights (alignment 1, uniformity 5); ``joint`` trains everything on classification 2, alignment 5, uniformity
        2 (the paper's); ``scoring_sheet`` starts by finding each prototype's source (the training patch where it is
        most present, prototypes unchanged) and then trains only the scoring sheet with the ``sparsity`` term, so the
        sheet ends sparse on fixed prototypes (a sparsity term in ``joint`` pruned the sheet before the prototypes
        meant anything). The push callback finds the sources again, and sets the abstention thresholds, after the
        last step. Lengths are for 30 epochs and scale to any budget (:func:`pellucid.models.recipe.fit_phases`); the
        pretraining is short because on the phantom the classes come from the joint phase (16 epochs: 1, 13, 2).
        """
        features = ["backbone", "add_on"]
        sheet_lr = {"scoring_sheet": 5.0e-2}  # the paper's classifier rate; the sheet's weights start at about 1
        guidance = {"mask_guidance": 2.0} if self.mask_guidance else {}
        balance = {"patch_balance": self.patch_balance} if self.patch_balance else {}
        return Recipe(
            phases=[
                Phase("pretrain", 2, train=features, loss_weights={
                    "classification": 0.0, "alignment": 1.0, "uniformity": 5.0, "sparsity": 0.0,
                    **{name: 0.0 for name in guidance}, **balance}),
                Phase("joint", 25, train="all", lr=sheet_lr, loss_weights={
                    "classification": 2.0, "alignment": 5.0, "uniformity": 2.0, "sparsity": 0.0, **guidance,
                    **balance}),
                Phase("scoring_sheet", 3, train=["scoring_sheet"], lr=sheet_lr, push=True, loss_weights={
                    "classification": 2.0, "alignment": 0.0, "uniformity": 0.0, "sparsity": 3.0e-3, **guidance,
                    **{name: 0.0 for name in balance}}),
            ],
            push=PushOptions(),
        )

    # ------------------------------------------------------------------------------ explanation protocol
    def explanation_head(self) -> LinearExplanationHead:
        """The scoring sheet (``relu`` of its parameter, no bias) over ``prototype_similarity``."""
        return LinearExplanationHead("prototype_similarity", self.class_weights().detach(), None,
                                     lambda _image, output: output.prototype_similarity)

    def prototype_classes(self) -> Tensor:
        """(P,) the class each prototype weighs most for; ``-1`` where it has no positive weight (shared prototypes)."""
        weights = self.class_weights().detach()
        return weights.argmax(dim=0).masked_fill(~(weights > 0).any(dim=0), -1)

    def prototype_provenance(self) -> list[dict[str, Any] | None]:
        """The training patch where each prototype is most present (``None`` until found), as plain values.

        Keys as ProtoPNet's push record (:class:`~pellucid.models.prototype_layer.PrototypeSource`); ``distance`` is
        ``1 - presence`` at the source.
        """
        return [None if entry is None else dict(entry) for entry in self.sources.entries]

    def record_prototype_sources(self, provenance: Sequence[dict[str, Any] | None]) -> None:
        """Keep the sources found after training (one entry or ``None`` per prototype); prototypes are unchanged.

        Raises:
            ValueError: when the number of entries is not ``P``.
        """
        if len(provenance) != self.num_prototypes:
            raise ValueError(f"{self.name}: expected {self.num_prototypes} prototype sources, got {len(provenance)}")
        self.sources.entries = [None if entry is None else dict(entry) for entry in provenance]

    def abstentions(self, output: ModelOutput) -> Tensor:
        """(B,) True where no weighted prototype is present, or the top score is below its class's threshold."""
        return output.aux["abstained"]

    @torch.no_grad()
    def calibrate_abstention(self, logits: Tensor) -> None:
        """Set each class's abstention threshold from the training images' scores.

        The threshold of class k is the ``abstention_quantile`` of the top scores of the training images predicted
        as k (images without evidence left out; a class predicted for none keeps 0).

        Args:
            logits: (N, K) eval-mode scores of the training images.
        """
        thresholds = torch.zeros_like(self.abstention_thresholds)
        if self.abstention_quantile > 0 and logits.numel():
            top = logits.detach().float().max(dim=1)
            for k in range(self.num_classes):
                values = top.values[(top.indices == k) & (top.values > 0)]
                if values.numel():
                    thresholds[k] = torch.quantile(values, self.abstention_quantile).to(thresholds)
        self.abstention_thresholds.copy_(thresholds)

    def forget_training_data(self) -> list[str]:
        """Forget the sources and the abstention thresholds (they describe the old data; the recipe redoes them)."""
        found = sum(entry is not None for entry in self.sources.entries)
        calibrated = bool((self.abstention_thresholds != 0).any())
        self.sources.entries = [None] * self.num_prototypes
        self.abstention_thresholds.zero_()
        return [f"  forgot the sources of {found} prototype(s) and the abstention thresholds: the recipe finds them "
                "again on this data"] if found or calibrated else []


@register_model(expected_parameters={2: 97_680, 3: 287_184})
def pipnet(spatial_dims: int, **kwargs: Any) -> PIPNet:
    """PIP-Net (shared prototypes, softmax patch presence, non-negative sparse scoring sheet, abstention)."""
    return PIPNet(spatial_dims, **{"backbone": "monai/convnet", **kwargs})
