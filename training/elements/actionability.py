"""Actionability: can a person act on the explanation, and does the model let them?

- Shortcut flags: how much evidence sits on a known shortcut marker (:func:`marker_enrichment`).
- Concept interventions, for models whose protocol says they take them (:func:`accepts_interventions`); the
  intervention curves themselves are :class:`~pellucid.training.concepts.interventions.InterventionCurve`.

Per-batch measurements; the aggregation over an epoch lives in :mod:`pellucid.training.elements.evaluator`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pellucid.models import InterpretableModel


def marker_enrichment(maps: Tensor, marker: Tensor) -> Tensor:
    """(N,) mean evidence on the marker over the image's mean evidence, for the N samples that carry a marker.

    1 is what a uniform map gives; a map with no evidence gives 0. Unlike the raw share of mass, it does not depend
    on how small the marker is next to the map's resolution (a stride-8 Grad-CAM cannot put most of its mass on a
    4-pixel marker even when that marker decides the class).
    """
    evidence, on_marker = maps.flatten(1).clamp_min(0), marker.flatten(1) > 0.5
    keep = on_marker.any(dim=1)
    evidence, on_marker = evidence[keep], on_marker[keep]
    inside = (evidence * on_marker).sum(dim=1) / on_marker.sum(dim=1)
    overall = evidence.mean(dim=1)
    return torch.where(overall > 0, inside / overall.clamp_min(1e-12), torch.zeros_like(overall))


def accepts_interventions(model: nn.Module) -> bool:
    """Whether the model takes concept interventions, through the protocol (``False`` for a plain module)."""
    return isinstance(model, InterpretableModel) and model.accepts_interventions()

