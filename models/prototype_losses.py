"""Optional loss terms of prototype networks (:class:`~pellucid.models.prototypes.PrototypeNetwork`).

They use more than the labels: expert masks, finding annotations, and the spread of the prototypes themselves.

- :func:`mask_guidance_loss`: class evidence belongs on the lesion mask (``mask_guidance``).
- :func:`concept_guidance_loss`: latent patches on a lesion show its annotated findings (``concept_guidance``).
- :func:`diversity_loss`: prototypes of one class stay apart (``diversity``).
- :func:`lesion_coverage` / :func:`lesion_cells`: which feature cells a lesion covers, shared by the terms above,
  by push (``within_mask``) and by the benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pellucid.models.concept_layers import ConceptBank
from pellucid.models.maps import resize_maps

MASK_GUIDANCE_RESOLUTIONS = ("feature", "input")


def lesion_coverage(mask: Tensor, feature_size: Sequence[int]) -> Tensor:
    """(B, *s) share of each feature cell's input pixels/voxels that lie on the lesion, from a (B, 1, *S) mask."""
    pool = F.adaptive_avg_pool2d if mask.ndim == 4 else F.adaptive_avg_pool3d
    return pool((mask > 0.5).float(), tuple(feature_size))[:, 0]


def mask_guidance_loss(prototype_maps: Tensor, mask: Tensor, own: Tensor, temperature: float = 1.0,
                       resolution: str = "feature", interpolation: str = "linear") -> Tensor:
    """Penalise prototype activation where it should not be (after Barnett et al., Nat. Mach. Intell. 2021).

    Own-class prototypes are penalised for the share of their activation that lies outside the lesion mask, where
    the share is that of a spatial softmax of the map, and a feature cell counts as outside by the share of its
    input pixels off the lesion: the term is near 0 only when the map's peak sits on a cell the lesion covers and
    stands well above the rest of the image, so it asks a prototype to put its peak on the lesion (a cell that only
    grazes the lesion is not enough: its center, where an upsampled map peaks, lies off the lesion). (A share of
    the raw map relative to its maximum would not: a sharp peak anywhere makes it small.) Other-class prototypes are
    penalised for their (absolute) activation everywhere. Each part is averaged over its prototypes and the
    locations; only samples whose mask is not empty count (a scan without a lesion has nothing to point at).

    With ``resolution="input"`` the own-class part is taken on the maps upsampled to the mask (by
    ``interpolation``, as the model's ``localization`` is), against the mask itself: it then asks for the peak of
    the map a user sees to lie on the lesion, which a lesion smaller than a cell can only have when the
    neighbouring cells' activations place the peak between cell centers (``interpolation="cubic"``; a linearly
    upsampled map always peaks at a cell center).

    Args:
        prototype_maps: (B, P, *s) non-negative activations (log similarities) at feature resolution.
        mask: (B, 1, *S) ground-truth mask at input resolution.
        own: (B, P) True where the prototype belongs to one of the sample's classes.
        temperature: Of the spatial softmax; lower values weigh the peak more (towards "is the peak outside").
        resolution: ``"feature"`` (cells, weighted by the share of their pixels off the lesion) or ``"input"``.
        interpolation: ``"linear"`` or ``"cubic"``, for ``resolution="input"`` (see
            :func:`~pellucid.models.maps.resize_maps`).

    Returns:
        Mean over annotated samples of the two parts; 0, still in the graph, when no sample has a mask.
    """
    if resolution not in MASK_GUIDANCE_RESOLUTIONS:
        raise ValueError(f"mask_guidance_resolution must be one of {list(MASK_GUIDANCE_RESOLUTIONS)}, "
                         f"got {resolution!r}")
    annotated = mask.flatten(1).amax(dim=1) > 0.5
    if not bool(annotated.any()):
        return prototype_maps.sum() * 0.0
    annotated_maps, mask, own = prototype_maps[annotated], mask[annotated], own[annotated]
    maps = annotated_maps.flatten(2)
    pairs = own.nonzero(as_tuple=True)  # (sample, prototype) of every own-class map: only those are upsampled
    if resolution == "input":
        placed = resize_maps(annotated_maps[pairs].unsqueeze(0), mask.shape[2:], interpolation)[0].flatten(1)
        outside = 1.0 - (mask > 0.5).float().flatten(1)  # (N, V)
    else:
        placed = maps[pairs]
        outside = 1.0 - lesion_coverage(mask, prototype_maps.shape[2:]).flatten(1)  # share of each cell off the lesion
    share = (torch.softmax(placed / temperature, dim=1) * outside[pairs[0]]).sum(dim=1)  # (own pairs,)
    share_outside = torch.zeros(own.shape, dtype=share.dtype, device=share.device).index_put(pairs, share)
    own = own.float()
    own_part = share_outside.sum(dim=1) / own.sum(dim=1).clamp_min(1.0)
    other_part = (maps.mean(dim=2) * (1.0 - own)).sum(dim=1) / (1.0 - own).sum(dim=1).clamp_min(1.0)
    return (own_part + other_part).mean()


def lesion_cells(mask: Tensor, feature_size: Sequence[int], min_share: float = 0.5) -> Tensor:
    """(B, *s) True on the feature cells that show a sample's lesion; all False without lesion.

    A cell shows the lesion when the lesion covers it at least ``min_share`` as well as it covers its best-covered
    cell, so a lesion smaller than one cell still has its cell.

    Args:
        mask: (B, 1, *S) lesion mask at input resolution.
        feature_size: ``*s``.
        min_share: Share of the best cell's coverage a cell needs.
    """
    covered = lesion_coverage(mask, feature_size)
    best = covered.flatten(1).amax(dim=1).view(-1, *([1] * len(feature_size)))
    return (covered > 0) & (covered >= min_share * best)


def concept_guidance_loss(patch_concept_logits: Tensor, targets: Tensor, mask: Tensor, bank: ConceptBank,
                          min_share: float = 0.5) -> Tensor:
    """Teach the latent patches on a lesion to show its annotated findings (concept guidance).

    A linear probe reads concepts from every latent patch (``patch_concept_logits``); on the cells that show the
    lesion (:func:`lesion_cells`) it must give the sample's annotated concepts, by the concept bottleneck's own
    loss (class-balanced binary cross-entropy, MSE of z-scores; NaN targets skipped). The prototypes live in the
    same latent space, so patches with the same findings move together and push picks prototypes that show one
    combination of findings (in the spirit of the fine-grained finding annotations of Barnett et al., Nat. Mach.
    Intell. 2021). Samples without lesion (empty mask) contribute nothing: their concepts describe no patch.

    Args:
        patch_concept_logits: (B, M, *s) raw probe output per latent patch.
        targets: (B, M) annotated concepts in their units (NaN where not annotated).
        mask: (B, 1, *S) lesion mask at input resolution.
        bank: The concept specifications and statistics (:class:`~pellucid.models.concept_layers.ConceptBank`).
        min_share: Which cells show the lesion (:func:`lesion_cells`); 0 takes every cell the lesion touches.

    Returns:
        The loss; 0, still in the graph, when no sample has a lesion.
    """
    cells = lesion_cells(mask, patch_concept_logits.shape[2:], min_share)  # (B, *s)
    if not bool(cells.any()):
        return patch_concept_logits.sum() * 0.0
    raw = patch_concept_logits.movedim(1, -1)[cells]  # (N, M): one row per lesion cell
    sample = torch.nonzero(cells.flatten(1))[:, 0]
    return bank.loss(raw, targets[sample])


def diversity_loss(distances: Tensor, prototype_classes: Tensor, active: Tensor) -> Tensor:
    """Keep the prototypes of one class apart: mean of ``1 / (1 + d)`` over pairs of active same-class prototypes.

    Without it several prototypes of a class can settle on the same region of the latent space, push then projects
    them onto the same training patch, and they stay identical (equal gradients) for the rest of training. The term
    is bounded (1 for identical prototypes) and so is its gradient. In the spirit of the diversity terms of later
    prototype networks (e.g. the orthogonality loss of Donnelly et al., "Deformable ProtoPNet", CVPR 2022).

    Args:
        distances: (P, P) mutual prototype distances (:meth:`PrototypeLayer.mutual_distances`).
        prototype_classes: (P,) class of each prototype.
        active: (P,) False for pruned prototypes.

    Returns:
        The mean; 0, still in the graph, when no class has two active prototypes.
    """
    same = (prototype_classes.view(-1, 1) == prototype_classes.view(1, -1)) & active.view(-1, 1) & active.view(1, -1)
    pairs = same & ~torch.eye(len(prototype_classes), dtype=torch.bool, device=distances.device)
    if not bool(pairs.any()):
        return distances.sum() * 0.0
    return (1.0 / (1.0 + distances))[pairs].mean()


__all__ = ["concept_guidance_loss", "diversity_loss", "lesion_cells", "lesion_coverage", "mask_guidance_loss"]
