"""Where a concept model reads a finding: the concept-map guidance term of ``cbm``, ``cbm_spatial`` and ``cem``.

A concept bottleneck's concept layer is linear in the feature map, so every concept has a map of what each location
contributes to it (``ModelOutput.concept_maps``). Trained on image-level findings alone, nothing asks that map to
peak on the lesion: the model may read "spiculated" from any location whose features happen to correlate with it
(measured on the phantom: the shipped 2D ``cbm``'s maps of the lesion findings peaked on the lesion in 0.42-0.58 of
the scans showing the finding). Where the data has lesion masks, :func:`concept_map_guidance_loss` asks each present
finding's map to peak on the lesion, in the way mask guidance asks it of a prototype's map (after the fine
annotation loss of Barnett et al., "A case-based interpretable deep learning model for classification of mass
lesions in digital mammography", Nat. Mach. Intell. 2021).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pellucid.models.concept_layers import ConceptBank
from pellucid.models.concepts import ConceptSpec
from pellucid.models.prototype_losses import lesion_coverage


def guided_pairs(targets: Tensor, mask: Tensor, bank: ConceptBank, concepts: Sequence[str] | None = None) -> Tensor:
    """(B, M) True for the (sample, concept) pairs whose concept map must peak on the sample's lesion.

    Only samples whose lesion mask is not empty are guided. ``concepts=None`` guides every binary finding annotated
    present (>= 0.5): a finding annotated absent has nothing to point at. A list names the concepts to guide: its
    binary findings where annotated present, its continuous concepts wherever annotated (a measurement of the lesion,
    such as its diameter, is read on the lesion whatever its value).
    """
    lesion = mask.flatten(1).amax(dim=1) > 0.5  # (B,)
    if concepts is None:
        selected = bank.is_binary
    else:
        names = [spec.name for spec in bank.concept_specs]
        selected = torch.tensor([name in concepts for name in names], device=targets.device)
    annotated = ~torch.isnan(targets)
    present = torch.nan_to_num(targets, nan=0.0) >= 0.5
    wanted = torch.where(bank.is_binary.unsqueeze(0), present, annotated)
    return wanted & selected.unsqueeze(0) & lesion.unsqueeze(1)


def check_guided_concepts(owner: str, concepts: Sequence[str] | None, specs: Sequence[ConceptSpec]) -> None:
    """Raise ``ValueError`` naming ``owner``'s option when ``concepts`` names a concept the model does not predict."""
    if concepts is None:
        return
    names = [spec.name for spec in specs]
    unknown = [name for name in concepts if name not in names]
    if unknown or not concepts:
        raise ValueError(f"{owner}: mask_guided_concepts: expected a non-empty list of this model's concepts "
                         f"{names}, got {list(concepts)!r}; name concepts of the data module or leave it unset "
                         "(every binary finding)")


def concept_map_guidance_loss(scores: Tensor, mask: Tensor, guided: Tensor, temperature: float = 1.0) -> Tensor:
    """Share of each guided concept map's spatial softmax that lies off the lesion, mean over guided pairs.

    A feature cell counts as off the lesion by the share of its input pixels/voxels the lesion does not cover
    (:func:`~pellucid.models.prototype_losses.lesion_coverage`), so the term is near 0 only when the map's peak
    sits on a cell the lesion covers and stands above the rest of the image.

    Args:
        scores: (B, M, *s) per-location concept scores; the softmax over locations of ``scores / temperature`` is
            what must lie on the lesion (pass log-probabilities for maps that already are a softmax).
        mask: (B, 1, *S) lesion mask at input resolution.
        guided: (B, M) which (sample, concept) pairs are guided (:func:`guided_pairs`).
        temperature: Of the spatial softmax; lower values weigh the peak more.

    Returns:
        The mean off-lesion share; 0, still in the graph, when no pair is guided.
    """
    if temperature <= 0:
        raise ValueError(f"concept-map guidance temperature must be > 0, got {temperature!r}")
    if not bool(guided.any()):
        return scores.sum() * 0.0
    sample, concept = guided.nonzero(as_tuple=True)
    maps = scores[sample, concept].flatten(1)  # (N, L)
    outside = 1.0 - lesion_coverage(mask, scores.shape[2:]).flatten(1)[sample]  # (N, L)
    return (torch.softmax(maps.float() / temperature, dim=1) * outside).sum(dim=1).mean()
