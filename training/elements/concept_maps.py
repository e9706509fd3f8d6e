"""Where a concept model reads each finding: the pointing game of its concept maps (physical attribution).

A concept map (``ModelOutput.concept_maps``, (B, M, *s)) says what each location contributes to a concept (``cbm``,
``cem``: signed evidence) or where the concept was read (``cbm_spatial``: attention). A finding's map points at the
lesion when its maximum, upsampled to the input, lies on the lesion mask. It is scored on the scans that show the
finding: a binary concept on the samples where it is annotated present (a finding that is absent has nothing to
point at), a continuous concept (a lesion's diameter, its contrast) on every sample with a lesion. A constant map
points at nothing and counts as a miss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from pellucid.models.concepts import ConceptSpec


def concept_shown(targets: Tensor, specs: Sequence[ConceptSpec]) -> Tensor:
    """(B, M) True where concept ``m`` is there to point at: a binary finding annotated present; any continuous one.

    NaN (not annotated) is never shown. Whether the sample has a lesion at all is the mask's business.
    """
    binary = torch.tensor([spec.kind == "binary" for spec in specs], device=targets.device)
    annotated = ~torch.isnan(targets)
    return annotated & (~binary.unsqueeze(0) | (torch.nan_to_num(targets) >= 0.5))


class ConceptMapPointing(Metric):
    """Per concept, the share of (scan, concept) pairs showing the concept whose map peaks on the lesion.

    ``update(concept_maps, mask, targets)`` takes the (B, M, *s) maps at any resolution, the (B, 1, *S) lesion mask
    and the (B, M) annotated concepts in their units. ``compute()`` returns ``{name: share}`` per concept (NaN when
    no scan showed it) and ``"lesion_findings"``: the pooled share over the binary concepts.

    Args:
        concept_specs: The model's concepts, in the order of the maps' and targets' columns.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, concept_specs: Sequence[ConceptSpec], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.concept_specs = list(concept_specs)
        count = len(self.concept_specs)
        self.add_state("hits", default=torch.zeros(count, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(count, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, concept_maps: Tensor, mask: Tensor, targets: Tensor) -> None:
        """Add a batch (see the class docstring)."""
        if concept_maps.shape[:2] != targets.shape or targets.shape[1] != len(self.concept_specs):
            raise ValueError(f"ConceptMapPointing: concept_maps {tuple(concept_maps.shape)} and targets "
                             f"{tuple(targets.shape)} must be (B, {len(self.concept_specs)}, ...) and "
                             f"(B, {len(self.concept_specs)})")
        lesion = (mask > 0.5).flatten(1)  # (B, V)
        shown = concept_shown(targets, self.concept_specs) & lesion.any(dim=1, keepdim=True)
        if not bool(shown.any()):
            return
        mode = "bilinear" if mask.ndim == 4 else "trilinear"
        maps = F.interpolate(concept_maps.float(), size=tuple(mask.shape[2:]), mode=mode, align_corners=False)
        flat = maps.flatten(2)  # (B, M, V)
        peak = flat == flat.amax(dim=2, keepdim=True)
        varies = flat.amax(dim=2) > flat.amin(dim=2)  # a constant map points at nothing
        hit = (peak & lesion.unsqueeze(1)).any(dim=2) & varies
        self.hits += (hit & shown).sum(dim=0).to(self.hits.dtype)
        self.total += shown.sum(dim=0).to(self.total.dtype)

    def compute(self) -> dict[str, float]:
        """``{concept name: share}`` and ``lesion_findings`` (binary concepts pooled); NaN where nothing was shown."""
        shares = self.hits / self.total.clamp_min(1)
        result = {spec.name: float(shares[m]) if self.total[m] > 0 else float("nan")
                  for m, spec in enumerate(self.concept_specs)}
        binary = torch.tensor([spec.kind == "binary" for spec in self.concept_specs], device=self.hits.device)
        total = self.total[binary].sum()
        result["lesion_findings"] = float(self.hits[binary].sum() / total) if total > 0 else float("nan")
        return result
