"""Model transparency: is the decision mechanism readable, and is the explanation faithful to it?

- The linear head over the explanation, through the protocol (:meth:`~pellucid.models.InterpretableModel.
  explanation_head`): exact logit reconstruction from the explanation, and the head's sparsity.
- Deletion faithfulness: how fast the class probability falls as the most-evidenced voxels are deleted (Petsiuk et
  al., "RISE", BMVC 2018), against the least-evidenced-first reference curve (Samek et al., IEEE TNNLS 2017).

Per-batch measurements; the aggregation over an epoch lives in :mod:`pellucid.training.elements.evaluator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from pellucid.models import InterpretableModel, ModelOutput
from pellucid.models.explanation import LinearExplanationHead
from pellucid.training.metrics import probabilities

__all__ = ["DeletionBaseline", "LinearExplanationHead", "curve_area", "deletion_curve", "deletion_order",
           "explanation_head", "head_sparsity", "logit_reconstruction"]

DeletionBaseline = Literal["mean", "zero"]


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

