"""Where a concept model reads a finding: the concept-map guidance term of ``cbm``, ``cbm_spatial`` and ``cem``.

A concept bottleneck's concept layer is linear in the feature map, so every concept has a map of what each location
contributes to it (``ModelOutput.concept_maps``). Trained on image-level findings alone, nothing asks that map to
peak on the lesion: the model may read "spiculated" from any location whose features happen to correlate with it
(measured on the phantom: the shipped 2D ``cbm``'s maps of the lesion findings peaked on the lesion in 0.42-0.58 of
the scans showing the finding). Where the data has lesion masks, :func:`concept_map_guidance_loss` asks each present
finding's map (and, where ``mask_guided_concepts`` names them, the maps of the lesion's measurements such as its
diameter) to peak on the lesion, in the way mask guidance asks it of a prototype's map (after the fine
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


def guided_pairs(targets: Tensor, mask: Tensor, bank: ConceptBank, selected: Tensor | None = None) -> Tensor:
    """(B, M) True for the (sample, concept) pairs whose concept map must peak on the sample's lesion.

    Only samples whose lesion mask is not empty are guided. ``selected`` ((M,) bool, from
    :func:`guided_concept_mask`) says which concepts are guided; ``None`` means every binary finding. A guided binary
    finding counts where annotated present (>= 0.5): a finding annotated absent has nothing to point at. A guided
    continuous concept counts wherever annotated: a measurement of the lesion, such as its diameter, is read on the
    lesion whatever its value.
    """
    lesion = mask.flatten(1).amax(dim=1) > 0.5  # (B,)
    annotated = ~torch.isnan(targets)
    present = torch.nan_to_num(targets, nan=0.0) >= 0.5
    wanted = torch.where(bank.is_binary.unsqueeze(0), present, annotated)
    chosen = bank.is_binary if selected is None else selected
    return wanted & chosen.unsqueeze(0) & lesion.unsqueeze(1)


def guided_concept_mask(owner: str, concepts: Sequence[str] | None, specs: Sequence[ConceptSpec]) -> Tensor:
    """(M,) True for the concepts ``owner``'s ``mask_guided_concepts`` names; ``None`` names every binary finding.

    Raises:
        ValueError: naming the option, the model's concepts and the value, when ``concepts`` is empty or names a
            concept the model does not predict.
    """
    names = [spec.name for spec in specs]
    if concepts is None:
        return torch.tensor([spec.kind == "binary" for spec in specs])
    if not concepts or any(name not in names for name in concepts):
        raise ValueError(f"{owner}: mask_guided_concepts: expected a non-empty list of this model's concepts "
                         f"{names}, got {list(concepts)!r}; name concepts of the data module or leave it unset "
                         "(every binary finding)")
    return torch.tensor([name in concepts for name in names])


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
