"""Per-batch measurements behind the five-element metrics, computed from ``ModelOutput`` and the batch alone.

Nothing here knows a model family: evidence maps come from ``localization``; heads and interventions from the
explanation protocol of :class:`~pellucid.models.InterpretableModel` (``explanation_head()``,
``accepts_interventions()``). The aggregation over an epoch (and across DDP processes) lives in
:mod:`pellucid.training.elements.callback`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pellucid.models import InterpretableModel, ModelOutput
from pellucid.models.explanation import LinearExplanationHead  # also importable from here, as before
from pellucid.models.gradcam import normalize_per_map
from pellucid.training.elements.localization import class_maps
from pellucid.training.metrics import probabilities

DeletionBaseline = Literal["mean", "zero"]


# ------------------------------------------------------------------------------------------------ evidence
def predicted_classes(output: ModelOutput) -> Tensor | None:
    """(B,) index of the highest logit, or ``None`` when the model makes no logits (segmenters)."""
    return None if output.logits is None else output.logits.argmax(dim=1)


def evidence_maps(output: ModelOutput, classes: Tensor | None = None) -> Tensor | None:
    """Each sample's (B, *S) evidence map: the ``localization`` of its class.

    Args:
        output: The model's output.
        classes: (B,) class per sample; default the predicted class (the evidence for the decision made). A
            class-agnostic (B, 1, *S) localization gives its one map; a model without logits (a segmenter) gives
            the maximum over its foreground channels (channel 0 is the background).

    Returns:
        (B, *S) maps in [0, 1], or ``None`` when the model returns no localization.
    """
    localization = output.localization
    if localization is None:
        return None
    if localization.shape[1] == 1:
        return localization[:, 0]
    if classes is None:
        classes = predicted_classes(output)
    if classes is None:
        return localization[:, 1:].amax(dim=1)
    return class_maps(localization, classes)


def upsample_to(maps: Tensor, size: Sequence[int]) -> Tensor:
    """(N, C, *s) feature-resolution maps -> (N, C, *size), (bi/tri)linear, each map rescaled to [0, 1]."""
    mode = "bilinear" if len(size) == 2 else "trilinear"
    resized = F.interpolate(maps.float(), size=tuple(size), mode=mode, align_corners=False)
    return normalize_per_map(resized)


def informative_maps(maps: Tensor) -> Tensor:
    """(B,) whether each evidence map varies (a constant map, e.g. all zeros, localizes nothing)."""
    flat = maps.flatten(1)
    return flat.amax(dim=1) > flat.amin(dim=1)


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


# ------------------------------------------------------------------------------------------ linear heads
def explanation_head(model: nn.Module) -> LinearExplanationHead | None:
    """The model's linear head over its explanation, through the protocol; ``None`` for a model without one."""
    return model.explanation_head() if isinstance(model, InterpretableModel) else None


def logit_reconstruction(head: LinearExplanationHead, image: Tensor, output: ModelOutput,
                         tolerance: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Recompute the logits from the explanation through the head.

    Returns:
        ``(error, exact)``: (B,) largest absolute logit difference per sample, and (B,) 1.0 where it is within
        ``tolerance * (1 + max |logit|)`` (float32 rounding), else 0.0.

    Raises:
        ValueError: when the head's shape does not fit the logits or the explanation.
    """
    if output.logits is None:
        raise ValueError("logit_reconstruction: the output has no logits")
    if head.weight.ndim != 2 or head.weight.shape[0] != output.logits.shape[1]:
        raise ValueError(f"explanation head ({head.source}): weight shape {tuple(head.weight.shape)} does not fit "
                         f"{output.logits.shape[1]} classes; expected ({output.logits.shape[1]}, D)")
    rebuilt = head.logits(image, output)
    error = (rebuilt - output.logits).abs().amax(dim=1)
    scale = output.logits.abs().amax(dim=1)
    return error, (error <= tolerance * (1.0 + scale)).float()


def head_sparsity(weight: Tensor, relative_tolerance: float = 1e-3) -> tuple[float, float]:
    """Share of negligible weights (|w| <= tol * max|w|) and the mean number of non-negligible weights per class."""
    magnitude = weight.detach().abs()
    peak = float(magnitude.max()) if magnitude.numel() else 0.0
    negligible = magnitude <= relative_tolerance * peak
    return float(negligible.float().mean()), float((~negligible).sum(dim=1).float().mean())


# --------------------------------------------------------------------------------------------- deletion
def deletion_order(maps: Tensor, generator: torch.Generator, least_first: bool = False) -> Tensor:
    """(B, V) voxel indices, most-evidenced first (MoRF), or least-evidenced first (LeRF); ties in random order.

    Args:
        maps: (B, *S) evidence maps.
        generator: CPU generator for tie-breaking.
        least_first: Least-evidenced first (the reference curve of Samek et al., IEEE TNNLS 2017).
    """
    flat = maps.flatten(1)
    shuffle = torch.rand(flat.shape, generator=generator).argsort(dim=1).to(flat.device)
    by_evidence = flat.gather(1, shuffle).argsort(dim=1, descending=not least_first, stable=True)
    return shuffle.gather(1, by_evidence)


@torch.no_grad()
def deletion_curve(model: nn.Module, image: Tensor, order: Tensor, classes: Tensor, fractions: Sequence[float],
                   task: str, baseline: DeletionBaseline = "mean") -> Tensor:
    """Probability of ``classes`` as the first voxels of ``order`` are deleted, for each fraction.

    Deleted voxels (every channel) take the image's mean (``"mean"``) or 0 (``"zero"``). Petsiuk et al., "RISE",
    BMVC 2018 (deletion metric).

    Returns:
        (B, len(fractions)) probabilities.
    """
    batch, voxels = order.shape
    spatial_axes = tuple(range(2, image.ndim))
    if baseline == "mean":
        fill = image.mean(dim=spatial_axes, keepdim=True)
    elif baseline == "zero":
        fill = image.new_zeros((*image.shape[:2], *[1] * len(spatial_axes)))
    else:
        raise ValueError(f"deletion baseline must be 'mean' or 'zero', got {baseline!r}")
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(voxels, device=order.device).expand(batch, voxels))
    rank = rank.view(batch, 1, *image.shape[2:])
    curve = []
    for fraction in fractions:
        deleted = rank < round(float(fraction) * voxels)
        logits = model(torch.where(deleted, fill, image), explain=False).logits
        curve.append(probabilities(logits, task).gather(1, classes.view(-1, 1))[:, 0])
    return torch.stack(curve, dim=1)


def curve_area(curve: Tensor, fractions: Sequence[float]) -> Tensor:
    """(B,) trapezoidal area under (B, T) curves over ``fractions``, divided by their span (a mean level)."""
    x = torch.tensor([float(f) for f in fractions], dtype=curve.dtype, device=curve.device)
    span = float(x[-1] - x[0])
    if span <= 0:
        raise ValueError(f"deletion fractions must increase from first to last, got {list(fractions)}")
    return torch.trapezoid(curve, x, dim=1) / span


# ------------------------------------------------------------------------------------------ interventions
def accepts_interventions(model: nn.Module) -> bool:
    """Whether the model takes concept interventions, through the protocol (``False`` for a plain module)."""
    return isinstance(model, InterpretableModel) and model.accepts_interventions()


# ------------------------------------------------------------------------------------------------- ranks
def average_ranks(values: Tensor) -> Tensor:
    """Ranks (0-based) of each row of (N, V) ``values``, ties sharing their average rank (as Spearman needs)."""
    ranks = torch.empty_like(values, dtype=torch.float64)
    for row, value in enumerate(values):
        unique, inverse, counts = torch.unique(value, sorted=True, return_inverse=True, return_counts=True)
        first = torch.cumsum(counts, dim=0) - counts
        ranks[row] = (first + (counts - 1) / 2.0).to(torch.float64)[inverse]
    return ranks


def binary_auroc(scores: Tensor, targets: Tensor) -> float | None:
    """AUROC of 1-D ``scores`` for 0/1 ``targets`` (Mann-Whitney U, ties counted half); ``None`` if one class only."""
    positive = targets >= 0.5
    num_positive, num_negative = int(positive.sum()), int((~positive).sum())
    if num_positive == 0 or num_negative == 0:
        return None
    ranks = average_ranks(scores.view(1, -1).to(torch.float64))[0] + 1.0
    u_statistic = float(ranks[positive].sum()) - num_positive * (num_positive + 1) / 2.0
    return u_statistic / (num_positive * num_negative)
