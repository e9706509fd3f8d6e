"""Localization metrics: does an explanation map point at the ground-truth lesion?

Each metric is a torchmetrics ``Metric`` (it synchronises across DDP processes) that takes one map per
sample, ``(B, *S)`` or ``(B, 1, *S)`` at input resolution, and the ground-truth ``mask`` ``(B, 1, *S)``.
Samples whose mask is empty (no lesion) are skipped: there is nothing to point at.
The evidence maps themselves come from ``ModelOutput.localization`` (:func:`evidence_maps`).
Use :func:`class_maps` to pick each sample's map for its true (or predicted) class from a
``(B, K, *S)`` localization.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from pellucid.models import ModelOutput
from pellucid.models.gradcam import normalize_per_map


def class_maps(localization: Tensor, classes: Tensor) -> Tensor:
    """Select, for each sample, the (B, *S) map of its class from a (B, K, *S) localization.

    A class-agnostic (B, 1, *S) localization gives its single map for every class.
    """
    if localization.shape[1] == 1:
        return localization[:, 0]
    index = classes.long().view(-1, 1, *([1] * (localization.ndim - 2))).expand(-1, 1, *localization.shape[2:])
    return localization.gather(1, index).squeeze(1)


def _prepare(maps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten to (N, V) for the samples with a non-empty mask."""
    if maps.ndim == mask.ndim:  # (B, 1, *S)
        maps = maps.squeeze(1)
    mask = mask.squeeze(1)
    if maps.shape != mask.shape:
        raise ValueError(f"localization metric: map shape {tuple(maps.shape)} and mask shape {tuple(mask.shape)} "
                         "must agree (maps at input resolution, one per sample)")
    maps, mask = maps.flatten(1).float(), mask.flatten(1) > 0.5
    keep = mask.any(dim=1)
    return maps[keep], mask[keep]


def dilate(mask: Tensor, radius: int) -> Tensor:
    """Dilate a (B, 1, *S) binary mask by ``radius`` pixels/voxels (a cube/square structuring element)."""
    if radius <= 0:
        return mask
    pool = F.max_pool2d if mask.ndim == 4 else F.max_pool3d
    return pool(mask.float(), kernel_size=2 * radius + 1, stride=1, padding=radius)


class SampleMean(Metric):
    """Mean of per-sample values, or of per-sample rows of ``width`` values; NaN before any sample.

    The one running mean of the evaluation: the localization metrics below average their per-sample scores with it,
    and the five-element evaluator its per-sample measurements (reconstruction error, deletion curves ...).

    Args:
        width: ``None`` for scalars per sample, else the length of each sample's row.
    """

    full_state_update = False

    def __init__(self, width: int | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        shape = () if width is None else (width,)
        self.add_state("total", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        """Add (N,) values (or (N, width) rows)."""
        self._accumulate(values)

    def _accumulate(self, values: Tensor) -> None:
        self.total += values.to(torch.float64).sum(dim=0)
        self.count += values.shape[0]

    def compute(self) -> Tensor:
        """Mean over every sample seen so far (NaN if there was none), in float64."""
        if self.count == 0:
            return torch.full_like(self.total, float("nan"))
        return self.total / self.count


class PointingGame(SampleMean):
    """Share of samples whose map's maximum lies inside the (optionally dilated) lesion mask.

    Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016. Ties at the maximum count as
    a hit when any tied location is inside.

    Args:
        tolerance: Dilate the mask by this many pixels/voxels before testing (0 = exact).
    """

    higher_is_better = True

    def __init__(self, tolerance: int = 0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.tolerance = tolerance

    def update(self, maps: Tensor, mask: Tensor) -> None:
        """Add a batch: ``maps`` (B, *S) or (B, 1, *S), ``mask`` (B, 1, *S)."""
        maps, mask = _prepare(maps, dilate(mask, self.tolerance) if mask.ndim > 2 else mask)
        if maps.numel() == 0:
            return
        peak = maps == maps.max(dim=1, keepdim=True).values
        self._accumulate((peak & mask).any(dim=1).float())


class EnergyInsideMask(SampleMean):
    """Share of the map's total (non-negative) mass that falls inside the lesion mask.

    Wang et al., "Score-CAM", CVPR-W 2020 (energy-based pointing game). A map with zero mass scores 0.
    """

    higher_is_better = True

    def update(self, maps: Tensor, mask: Tensor) -> None:
        """Add a batch: ``maps`` (B, *S) or (B, 1, *S), ``mask`` (B, 1, *S)."""
        maps, mask = _prepare(maps, mask)
        if maps.numel() == 0:
            return
        maps = maps.clamp_min(0)
        mass = maps.sum(dim=1)
        inside = (maps * mask).sum(dim=1)
        self._accumulate(torch.where(mass > 0, inside / mass.clamp_min(1e-12), torch.zeros_like(mass)))


class MaskDice(SampleMean):
    """Dice overlap between the map thresholded at ``threshold`` and the lesion mask, averaged over samples.

    Args:
        threshold: Map values ``>= threshold`` count as "pointed at" (maps are in [0, 1]).
        iou: Report intersection over union instead of Dice.
    """

    higher_is_better = True

    def __init__(self, threshold: float = 0.5, iou: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.threshold, self.iou = threshold, iou

    def update(self, maps: Tensor, mask: Tensor) -> None:
        """Add a batch: ``maps`` (B, *S) or (B, 1, *S), ``mask`` (B, 1, *S)."""
        maps, mask = _prepare(maps, mask)
        if maps.numel() == 0:
            return
        predicted = maps >= self.threshold
        intersection = (predicted & mask).sum(dim=1).float()
        sizes = predicted.sum(dim=1).float() + mask.sum(dim=1).float()
        if self.iou:
            self._accumulate(intersection / (sizes - intersection))
        else:
            self._accumulate(2 * intersection / sizes)


class ActivationPrecision(SampleMean):
    """Share of the map's top activations (positive values >= its ``percentile``-th percentile) inside the mask.

    Barnett et al., "A case-based interpretable deep learning model for classification of mass lesions in
    digital mammography", Nature Machine Intelligence 2021.

    Args:
        percentile: Percentile (0-100) of each map above which locations count as activated.
    """

    higher_is_better = True

    def __init__(self, percentile: float = 95.0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= percentile < 100.0:
            raise ValueError(f"percentile must be in [0, 100), got {percentile}")
        self.percentile = percentile

    def update(self, maps: Tensor, mask: Tensor) -> None:
        """Add a batch: ``maps`` (B, *S) or (B, 1, *S), ``mask`` (B, 1, *S)."""
        maps, mask = _prepare(maps, mask)
        if maps.numel() == 0:
            return
        cutoff = torch.quantile(maps, self.percentile / 100.0, dim=1, keepdim=True)
        active = (maps >= cutoff) & (maps > 0)  # zero evidence is no activation, even when tied at the cutoff
        count = active.sum(dim=1).float()
        inside = (active & mask).sum(dim=1).float()
        self._accumulate(torch.where(count > 0, inside / count.clamp_min(1), torch.zeros_like(count)))


# ------------------------------------------------------------------------------------- by lesion size
DIAMETER_BINS_MM: tuple[tuple[float, float], ...] = ((4.0, 8.0), (8.0, 12.0), (12.0, 16.0), (16.0, 20.0))
DIAMETER_CONCEPT = "diameter_mm"  # the concept column the size bins read (the phantom's column 0)


def diameter_bin_name(low: float, high: float) -> str:
    """``"4-8mm"``: the name of a size bin in metric names (``pointing_game_by_diameter/4-8mm``)."""
    return f"{low:g}-{high:g}mm"


class LocalizationBySize(Metric):
    """Pointing game and energy inside the mask per lesion-diameter bin (a small lesion is harder to point at).

    A sample falls in bin ``[low, high)`` by its lesion diameter (the last bin includes its upper end); samples
    outside every bin, without a lesion, or without a diameter annotation (NaN) are left out.

    Args:
        bins: ``(low, high)`` diameter bins in mm, increasing.
    """

    full_state_update = False

    def __init__(self, bins: Sequence[tuple[float, float]] = DIAMETER_BINS_MM, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.bins = [(float(low), float(high)) for low, high in bins]
        if any(high <= low for low, high in self.bins):
            raise ValueError(f"LocalizationBySize: every bin needs low < high, got {self.bins}")
        count = len(self.bins)
        for name in ("hits", "pointed", "energy", "samples"):
            self.add_state(name, default=torch.zeros(count, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, maps: Tensor, mask: Tensor, diameters: Tensor) -> None:
        """Add a batch: ``maps`` (B, *S), ``mask`` (B, 1, *S), ``diameters`` (B,) in mm."""
        informative = informative_maps(maps)
        for index, (low, high) in enumerate(self.bins):
            last = index == len(self.bins) - 1
            chosen = (diameters >= low) & ((diameters <= high) if last else (diameters < high))
            if not bool(chosen.any()):
                continue
            energy, pointing = EnergyInsideMask(), PointingGame()
            energy.update(maps[chosen], mask[chosen])
            keep = chosen & informative  # a constant map points at nothing (as in the overall pointing game)
            pointing.update(maps[keep], mask[keep])
            self.energy[index] += energy.total
            self.samples[index] += energy.count
            self.hits[index] += pointing.total
            self.pointed[index] += pointing.count

    def compute(self) -> dict[str, dict[str, float | None]]:
        """``{"pointing_game": {bin name: value}, "energy_inside_mask": {...}}``; ``None`` for an empty bin."""
        names = [diameter_bin_name(low, high) for low, high in self.bins]

        def share(numerator: Tensor, denominator: Tensor) -> dict[str, float | None]:
            return {name: float(n / d) if d > 0 else None for name, n, d in zip(names, numerator, denominator,
                                                                                strict=True)}

        return {"pointing_game": share(self.hits, self.pointed), "energy_inside_mask": share(self.energy, self.samples)}


# ------------------------------------------------------------------------------ evidence maps from the output
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

