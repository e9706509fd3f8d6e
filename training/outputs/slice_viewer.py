"""The report card's slice viewer for 3D explanations: the slice through the evidence peak beside the lesion centre.

For one volume, :func:`slice_viewer_figure` shows, for each orientation (axial, coronal, sagittal: slices across
axis 0, 1, 2 of a (D, H, W) volume), the slice through the peak of the evidence map (the argmax of the user-facing
``localization`` of the predicted class) next to the slice through the lesion centre (the centre of mass of the
mask): the image in grey, the map overlaid, the mask outlined in cyan, the voxel marked. When the two agree the
columns show the same slices; when the model looks elsewhere the reader sees both places at once. Slice indices
are in the panel titles and in :func:`slice_caption`, which the report shows under the figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pellucid.training.outputs.figures import (
    AXIS_NAMES,
    HEATMAP,
    _array,
    _squeeze,
    display_image,
    figure_png,
    peak_index,
)


def lesion_centre(mask: Any) -> tuple[int, int, int] | None:
    """The (D, H, W) voxel nearest the centre of mass of a (D, H, W) or (1, D, H, W) mask; ``None`` when empty."""
    array = _array(mask)
    if array is None:
        return None
    array = array[0] if array.ndim == 4 else array
    weights = np.where(array > 0.5, 1.0, 0.0)
    if weights.sum() == 0:
        return None
    grids = np.indices(array.shape, dtype=np.float64)
    centre = [float((grid * weights).sum() / weights.sum()) for grid in grids]
    return tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(centre, array.shape, strict=True))


def evidence_peak(evidence: Any) -> tuple[int, int, int] | None:
    """The voxel of the evidence map's maximum (first in row-major order on ties).

    ``None`` without a map or for a flat one (no voxel stands out: an untrained model's, or one that found nothing).
    """
    array = _array(evidence)
    if array is None or not np.isfinite(array).any() or float(np.nanmax(array)) <= float(np.nanmin(array)):
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.nanargmax(array)), array.shape))


def _voxel(index: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(i) for i in index) + ")"


def slice_caption(peak: tuple[int, ...] | None, centre: tuple[int, ...] | None) -> str:
    """Where the viewer's slices are: the evidence peak's and the lesion centre's voxel (D, H, W) and slice indices."""
    parts = []
    for name, index in (("evidence peak", peak), ("lesion centre (centre of mass of the mask)", centre)):
        if index is None:
            parts.append(f"{name}: none ({'flat or no map' if name == 'evidence peak' else 'no lesion'})")
            continue
        slices = ", ".join(f"{axis} {i}" for axis, i in zip(AXIS_NAMES, index, strict=True))
        parts.append(f"{name} at voxel (D, H, W) = {_voxel(index)}: {slices}")
    return "; ".join(parts)


def _panel(axis: Any, picture: np.ndarray, evidence: np.ndarray | None, mask: np.ndarray | None,
           mark: tuple[int, ...], title: str) -> Any:
    axis.imshow(picture, cmap="gray", interpolation="nearest")
    shown = None
    if evidence is not None:
        shown = axis.imshow(evidence, cmap=HEATMAP, alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear")
    if mask is not None and mask.max() > 0.5 > mask.min():
        axis.contour(mask > 0.5, levels=[0.5], colors="cyan", linewidths=0.8)
    axis.plot([mark[1]], [mark[0]], marker="+", color="lime", markersize=7, markeredgewidth=1.2)
    axis.set_title(title, fontsize=7)
    axis.set_xticks([])
    axis.set_yticks([])
    return shown


def slice_viewer_figure(image: Any, evidence: Any = None, mask: Any = None, title: str = "") -> Figure:
    """Per orientation, the slice through the evidence peak beside the slice through the lesion centre.

    Args:
        image: (C, D, H, W) volume.
        evidence: (D, H, W) evidence map in [0, 1] at input resolution, or ``None``.
        mask: (D, H, W) or (1, D, H, W) lesion mask, or ``None``. Without a lesion the lesion column is left out.
        title: Figure title.

    Raises:
        ValueError: for an image that is not a (C, D, H, W) volume.
    """
    grey = display_image(image)
    if grey.ndim != 3:
        raise ValueError(f"slice_viewer_figure: expected a (C, D, H, W) volume, got image of shape "
                         f"{tuple(_array(image).shape)}; 2D images are shown by figures.overlay_figure")
    heat, outline = _array(evidence), _squeeze(mask, 3)
    peak, centre = evidence_peak(heat), lesion_centre(outline)
    label = "evidence peak" if peak is not None else "flat or no map: volume centre"
    columns = [(label, peak or peak_index(None, grey.shape))]
    if centre is not None:
        columns.append(("lesion centre", centre))
    figure = Figure(figsize=(2.3 * len(columns) + 0.6, 6.6), layout="constrained")
    axes = figure.subplots(3, len(columns), squeeze=False)
    shown = None
    for row, orientation in enumerate(AXIS_NAMES):
        for column, (name, voxel) in enumerate(columns):
            index = voxel[row]
            pictures = [None if layer is None else np.take(layer, index, axis=row) for layer in (grey, heat, outline)]
            mark = tuple(v for a, v in enumerate(voxel) if a != row)
            shown = _panel(axes[row, column], *pictures, mark, f"{name}\n{orientation} slice {index}") or shown
    if shown is not None:
        figure.colorbar(shown, ax=axes[:, -1].tolist(), fraction=0.05, pad=0.02, label="evidence")
    figure.suptitle(title, fontsize=8)
    return figure


def slice_viewer_item(inputs: dict[str, Any], evidence: Any, title: str) -> tuple[str, bytes]:
    """The report card's ``(caption, PNG)`` of one example volume: its slice viewer, the slice indices in the caption.

    Args:
        inputs: The example's batch entries (``image`` (C, D, H, W), optional ``mask``).
        evidence: (D, H, W) evidence of the predicted class, or ``None``.
        title: The example's title (id, predicted and true class).
    """
    image, mask = inputs["image"], inputs.get("mask")
    where = slice_caption(evidence_peak(evidence), lesion_centre(_squeeze(mask, 3)))
    png = figure_png(slice_viewer_figure(image, evidence, mask, title))
    return f"{title}: slice viewer, evidence of the predicted class; {where}", png


__all__ = ["evidence_peak", "lesion_centre", "slice_caption", "slice_viewer_figure", "slice_viewer_item"]
