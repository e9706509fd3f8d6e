"""Deletion and insertion curves whose value does not depend on how tied evidence is ordered.

Deletion (Petsiuk et al., "RISE", BMVC 2018): the predicted-class probability as the most-evidenced voxels are
replaced by a baseline, fraction by fraction; its least-evidenced-first counterpart is the reference curve (Samek et
al., IEEE TNNLS 2017); insertion starts from the baseline and puts the most-evidenced voxels back first.

**Ties.** Evidence maps tie a lot (up to 40 % of a map's voxels share its minimum: ReLU floors, upsampled constant
cells), and the order in which tied voxels are deleted is arbitrary; deleting them one by one in some order makes the
curve measure that order (re-ordering the ties from random to raster doubled ProtoPNet's deletion faithfulness).
Here voxels of equal evidence are one **block**. A curve is only
evaluated where the deleted set is fixed by the values alone, at block boundaries (``{v: m(v) > t}`` and
``{v: m(v) >= t}`` for most-evidenced first). Where a fraction's cut ``n = round(f V)`` falls inside a block spanning
ranks ``[a, b)``, the curve is linearly interpolated between the two boundaries:
``p(n) = p(a) + (n - a) / (b - a) * (p(b) - p(a))``. Any order that sorts the map gives the same curve, and a map
without ties gives exactly the voxel-by-voxel curve. The share of voxels in large tie blocks (:func:`tied_share`)
is reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from pellucid.training.metrics import probabilities

__all__ = ["LARGE_TIE_SHARE", "DeletionBaseline", "curve_area", "deletion_curve", "deletion_order", "insertion_curve",
           "perturbation_curve", "tied_share"]

DeletionBaseline = Literal["mean", "zero"]
# tie blocks of at least this share of a map count in tied_share: smaller ones (pairs and quadruples that symmetric
# upsampling makes, and that float rounding of another batch composition can break) barely move a curve
LARGE_TIE_SHARE = 0.01


def deletion_order(maps: Tensor, generator: torch.Generator | None = None, least_first: bool = False) -> Tensor:
    """(B, V) voxel indices, most-evidenced first (MoRF) or least-evidenced first (LeRF).

    Tied voxels come in random order (``generator``) or in raster order (``None``); the curves of
    :func:`perturbation_curve` given ``maps`` do not depend on which.

    Args:
        maps: (B, *S) evidence maps.
        generator: CPU generator for random tie-breaking; ``None`` keeps tied voxels in raster order.
        least_first: Least-evidenced first (the reference curve of Samek et al., IEEE TNNLS 2017).
    """
    flat = maps.flatten(1)
    if generator is None:
        return flat.argsort(dim=1, descending=not least_first, stable=True)
    shuffle = torch.rand(flat.shape, generator=generator).argsort(dim=1).to(flat.device)
    by_evidence = flat.gather(1, shuffle).argsort(dim=1, descending=not least_first, stable=True)
    return shuffle.gather(1, by_evidence)


def tied_share(maps: Tensor) -> Tensor:
    """(B,) share of each map's voxels in a block of equal values holding at least :data:`LARGE_TIE_SHARE` of it.

    At least two voxels; e.g. 40 % of a map tied at its minimum gives 0.4, scattered pairs of equal values give 0.
    """
    ordered = maps.flatten(1).sort(dim=1).values
    start, end = _block_bounds(ordered)
    voxels = ordered.shape[1]
    size = end[:, 1:] - start[:, :voxels]  # voxel i lies in the block from the last boundary <= i to the next > i
    return (size >= max(2, math.ceil(LARGE_TIE_SHARE * voxels))).float().mean(dim=1)


def _block_bounds(values: Tensor) -> tuple[Tensor, Tensor]:
    """(B, V + 1) start and end of the block of equal ``values`` (along the order) holding each cut position."""
    batch, voxels = values.shape
    boundary = torch.ones(batch, voxels + 1, dtype=torch.bool, device=values.device)
    boundary[:, 1:voxels] = values[:, 1:] != values[:, :-1]
    positions = torch.arange(voxels + 1, device=values.device).expand(batch, -1)
    start = torch.where(boundary, positions, torch.zeros_like(positions)).cummax(dim=1).values
    end = torch.where(boundary, positions, torch.full_like(positions, voxels)).flip(1).cummin(dim=1).values.flip(1)
    return start, end


def _check_sorted(values: Tensor) -> None:
    steps = values[:, 1:] - values[:, :-1]
    if not bool(((steps <= 0).all(dim=1) | (steps >= 0).all(dim=1)).all()):
        raise ValueError("perturbation curve: the order does not sort the maps (their values along it must only fall "
                         "or only rise); build it with deletion_order(maps, least_first=...)")


@torch.no_grad()
def perturbation_curve(model: nn.Module, image: Tensor, order: Tensor, classes: Tensor, fractions: Sequence[float],
                       task: str, baseline: DeletionBaseline = "mean", maps: Tensor | None = None,
                       insert: bool = False) -> Tensor:
    """Probability of ``classes`` as the first voxels of ``order`` are deleted (or inserted), for each fraction.

    Deleted voxels (every channel) take the image's mean (``"mean"``) or 0 (``"zero"``); with ``insert`` the image
    starts as that baseline and the first voxels of ``order`` get their values back. With ``maps``, voxels of equal
    evidence are deleted as one block and a cut inside a block is interpolated between its boundaries (module
    docstring): the curve does not depend on how ``order`` ranks tied voxels. Without ``maps`` every voxel is its own
    block (an explicit order, e.g. region by region, is followed voxel by voxel).

    Args:
        model: Returns a ``ModelOutput`` with ``logits`` for ``model(image, explain=False)``.
        image: (B, C, *S) images.
        order: (B, V) voxel indices (:func:`deletion_order`).
        classes: (B,) class whose probability is followed.
        fractions: Fractions of the voxels deleted (inserted).
        task: ``"multiclass"``, ``"multilabel"`` or ``"segmentation"`` (how logits become probabilities).
        baseline: ``"mean"`` or ``"zero"``.
        maps: (B, *S) the evidence ``order`` sorts; gives tied voxels one block.
        insert: Insertion instead of deletion.

    Returns:
        (B, len(fractions)) probabilities.

    Raises:
        ValueError: for an unknown baseline, or ``maps`` that ``order`` does not sort.
    """
    batch, voxels = order.shape
    spatial_axes = tuple(range(2, image.ndim))
    if baseline == "mean":
        fill = image.mean(dim=spatial_axes, keepdim=True).expand_as(image)
    elif baseline == "zero":
        fill = torch.zeros_like(image)
    else:
        raise ValueError(f"deletion baseline must be 'mean' or 'zero', got {baseline!r}")
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(voxels, device=order.device).expand(batch, voxels))
    rank = rank.view(batch, 1, *image.shape[2:])
    cuts = torch.tensor([round(float(f) * voxels) for f in fractions], device=order.device)
    if maps is None:
        start = end = cuts.expand(batch, -1)
    else:
        values = maps.flatten(1).gather(1, order)
        _check_sorted(values)
        block_start, block_end = _block_bounds(values)
        start, end = block_start[:, cuts], block_end[:, cuts]
    needed = sorted({(i, int(k)) for i in range(batch) for k in (*start[i].tolist(), *end[i].tolist())})
    probability = {}
    for first in range(0, len(needed), batch):  # the needed (sample, count) pairs, one batch of images at a time
        chunk = needed[first:first + batch]
        rows = torch.tensor([i for i, _ in chunk], device=image.device)
        counts = torch.tensor([k for _, k in chunk], device=image.device).view(-1, *[1] * (image.ndim - 1))
        kept = rank[rows] < counts
        inputs = torch.where(kept, image[rows], fill[rows]) if insert else torch.where(kept, fill[rows], image[rows])
        scores = probabilities(model(inputs, explain=False).logits, task).gather(1, classes[rows].view(-1, 1))[:, 0]
        probability.update(zip(chunk, scores.tolist(), strict=True))
    curve = torch.empty(batch, len(cuts), dtype=torch.float32)
    for i in range(batch):
        for column, cut in enumerate(cuts.tolist()):
            low, high = int(start[i, column]), int(end[i, column])
            weight = 0.0 if high == low else (cut - low) / (high - low)
            curve[i, column] = probability[(i, low)] + weight * (probability[(i, high)] - probability[(i, low)])
    return curve.to(image.device)


def deletion_curve(model: nn.Module, image: Tensor, order: Tensor, classes: Tensor, fractions: Sequence[float],
                   task: str, baseline: DeletionBaseline = "mean", maps: Tensor | None = None) -> Tensor:
    """Deletion curve (Petsiuk et al., "RISE", BMVC 2018): :func:`perturbation_curve` deleting along ``order``."""
    return perturbation_curve(model, image, order, classes, fractions, task, baseline, maps)


def insertion_curve(model: nn.Module, image: Tensor, order: Tensor, classes: Tensor, fractions: Sequence[float],
                    task: str, baseline: DeletionBaseline = "mean", maps: Tensor | None = None) -> Tensor:
    """Insertion curve (Petsiuk et al. 2018): :func:`perturbation_curve` inserting along ``order`` into the baseline."""
    return perturbation_curve(model, image, order, classes, fractions, task, baseline, maps, insert=True)


def curve_area(curve: Tensor, fractions: Sequence[float]) -> Tensor:
    """(B,) trapezoidal area under (B, T) curves over ``fractions``, divided by their span (a mean level)."""
    x = torch.tensor([float(f) for f in fractions], dtype=curve.dtype, device=curve.device)
    span = float(x[-1] - x[0])
    if span <= 0:
        raise ValueError(f"deletion fractions must increase from first to last, got {list(fractions)}")
    return torch.trapezoid(curve, x, dim=1) / span
