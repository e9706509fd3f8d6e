"""Prototype gallery: each prototype's source patch and its k nearest training patches, as arrays, figures and PNGs.

For every prototype, :func:`build_gallery` returns its source image (from the push provenance) and its k nearest
training images (from :func:`~pellucid.training.prototypes.nearest.find_nearest_patches`), each with the prototype's
activation upsampled to the image and the bounding box of the activation at or above the 95th percentile (the
"patch", as in ProtoPNet). A source patch is marked (+) at the centre of its latent cell's footprint (the push
provenance's ``image_center``). 3D images are shown as three orthogonal slices (axial, coronal, sagittal: across axis
0, 1, 2): through the source's recorded centre for a source patch, through the activation peak for the others.
The pieces are reusable: :func:`overlay_rgb` gives RGB arrays (for W&B images), :func:`gallery_figure` and
:func:`prototype_figure` give matplotlib figures, :func:`save_gallery` writes PNG files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from pellucid.models import InterpretableModel  # noqa: E402
from pellucid.models.gradcam import normalize_per_map  # noqa: E402
from pellucid.models.maps import upsample_evidence  # noqa: E402
from pellucid.training.outputs.figures import AXIS_NAMES  # noqa: E402
from pellucid.training.prototypes.nearest import NearestPatches  # noqa: E402


@dataclass
class SliceView:
    """One 2D view of a patch: the image, the prototype's activation and the patch box.

    Attributes:
        title: ``"image"`` in 2D; ``"<orientation> <index>"`` (e.g. ``"axial 12"``) for a slice of a 3D volume.
        image: (h, w) intensities.
        activation: (h, w) activation in [0, 1].
        box: ``(row_start, row_stop, col_start, col_stop)`` of the >= percentile activation.
        marker: ``(row, col)`` of the source patch's recorded centre in this view, or ``None``.
    """

    title: str
    image: np.ndarray
    activation: np.ndarray
    box: tuple[int, int, int, int]
    marker: tuple[float, float] | None = None

    @property
    def crop(self) -> np.ndarray:
        """The image inside the box: the patch itself."""
        r0, r1, c0, c1 = self.box
        return self.image[r0:r1, c0:c1]


@dataclass
class GalleryPatch:
    """A prototype's activation on one training image (one view in 2D, three in 3D)."""

    sample_id: str
    sample_index: int
    label: int
    distance: float
    views: list[SliceView]


@dataclass
class GalleryEntry:
    """One prototype: its class, its source patch (``None`` before push) and its nearest training patches."""

    prototype: int
    prototype_class: int
    class_name: str
    active: bool
    source: GalleryPatch | None
    nearest: list[GalleryPatch] = field(default_factory=list)


def _box(mask: np.ndarray) -> list[tuple[int, int]]:
    """Per axis (start, stop) of the True region (the whole axis when empty)."""
    spans = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        spans.append((int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, mask.shape[axis]))
    return spans


def patch_views(image: np.ndarray, activation: np.ndarray, percentile: float = 95.0,
                centre: Sequence[float] | None = None) -> list[SliceView]:
    """Views of one image (S) with its activation (S): the image itself in 2D, three orthogonal slices in 3D.

    Args:
        image: (S) intensities.
        activation: (S) activation in [0, 1].
        percentile: The box encloses the activation at or above this percentile.
        centre: A source patch's recorded centre in image coordinates (provenance ``image_center``): marked in
            every view, and in 3D the slices pass through it; ``None``: no marker, 3D slices through the peak.
    """
    high = (activation >= np.percentile(activation, percentile)) & (activation > activation.min())  # ties at the floor
    spans = _box(high)
    if image.ndim == 2:
        marker = None if centre is None else (float(centre[0]), float(centre[1]))
        return [SliceView("image", image, activation, (*spans[0], *spans[1]), marker)]
    if centre is None:
        point = np.unravel_index(int(activation.argmax()), activation.shape)
    else:
        point = tuple(int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(centre, activation.shape, strict=True))
    views = []
    for axis in range(3):
        cut = tuple(int(point[a]) if a == axis else slice(None) for a in range(3))
        rows, cols = (spans[a] for a in range(3) if a != axis)
        marker = None if centre is None else tuple(float(centre[a]) for a in range(3) if a != axis)
        views.append(SliceView(f"{AXIS_NAMES[axis]} {int(point[axis])}", image[cut], activation[cut], (*rows, *cols),
                               marker))
    return views


@torch.no_grad()
def activation_maps(model: InterpretableModel, image: torch.Tensor) -> np.ndarray:
    """(P, *S) activation of every prototype on one (C, *S) image, scaled to [0, 1] per prototype.

    Upsampled as the model upsamples its ``localization`` (``localization_interpolation``).
    """
    device = next(model.parameters()).device
    maps = model(image.unsqueeze(0).to(device), explain=True).prototype_maps[0]  # (P, *s): maps come when explained
    upsampled = upsample_evidence(maps.unsqueeze(0), image.shape[1:], model.localization_interpolation)
    return normalize_per_map(upsampled)[0].cpu().numpy()


def build_gallery(model: InterpretableModel, dataset: Dataset, nearest: NearestPatches | None = None,
                  class_names: Sequence[str] | None = None, percentile: float = 95.0,
                  prototypes: Sequence[int] | None = None) -> list[GalleryEntry]:
    """The gallery of ``prototypes`` (default: all), reading images from ``dataset`` by their push index.

    Args:
        model: A model with prototypes (``prototype_classes()`` and ``prototype_provenance()`` of the explanation
            protocol, ``prototype_maps`` in its output); put in eval mode for the passes and restored. A prototype of
            class -1 (PIP-Net: no weight for any class) is shown as ``no class``.
        dataset: The dataset push read (its indices are the provenance's ``sample_index``).
        nearest: k nearest training images per prototype; ``None`` shows the source patches only.
        class_names: Names of the classes.
        percentile: The patch box encloses the activation at or above this percentile.
        prototypes: Which prototypes to show.
    """
    classes, provenance = model.prototype_classes(), model.prototype_provenance()
    if classes is None or provenance is None:
        raise ValueError(f"build_gallery: {model.name} has no prototype classes or provenance (explanation protocol)")
    chosen = list(range(len(provenance))) if prototypes is None else list(prototypes)
    was_training = model.training
    model.eval()
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # sample index -> (image, all prototypes' activations)

    def patch(index: int, prototype: int, sample_id: str, label: int, distance: float,
              centre: Sequence[float] | None = None) -> GalleryPatch:
        if index not in cache:
            image = dataset[index]["image"]
            cache[index] = (image[0].cpu().numpy(), activation_maps(model, image))
        image, maps = cache[index]
        return GalleryPatch(sample_id, index, label, distance, patch_views(image, maps[prototype], percentile, centre))

    entries = []
    try:
        for p in chosen:
            klass, source = int(classes[p]), provenance[p]
            name = "no class" if klass < 0 else class_names[klass] if class_names else str(klass)
            entry = GalleryEntry(p, klass, name, not (source or {}).get("pruned"),
                                 None if source is None else patch(source["sample_index"], p, source["sample_id"],
                                                                   source["label"], source["distance"],
                                                                   source.get("image_center")))
            if nearest is not None:
                for j, index in enumerate(nearest.sample_index[p].tolist()):
                    if index >= 0:
                        entry.nearest.append(patch(index, p, nearest.ids[p][j], int(nearest.label[p, j]),
                                                   float(nearest.distance[p, j])))
            entries.append(entry)
    finally:
        model.train(was_training)
    return entries


def overlay_rgb(view: SliceView, alpha: float = 0.45) -> np.ndarray:
    """(h, w, 3) uint8: the image in grey, the activation as a heat map on top, the patch box in green."""
    image = view.image.astype(np.float64)
    grey = (image - image.min()) / max(float(np.ptp(image)), 1e-12)
    heat = plt.get_cmap("jet")(view.activation)[..., :3]
    rgb = (1 - alpha) * np.repeat(grey[..., None], 3, axis=2) + alpha * heat
    r0, r1, c0, c1 = view.box
    for row in (r0, r1 - 1):
        rgb[row, c0:c1] = (0.0, 1.0, 0.0)
    for col in (c0, c1 - 1):
        rgb[r0:r1, col] = (0.0, 1.0, 0.0)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _draw(axes: Any, view: SliceView, caption: str) -> None:
    axes.imshow(view.image, cmap="gray")
    axes.imshow(view.activation, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    r0, r1, c0, c1 = view.box
    axes.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, edgecolor="lime", linewidth=1.2))
    if view.marker is not None:
        axes.plot([view.marker[1]], [view.marker[0]], marker="+", color="cyan", markersize=6, markeredgewidth=1.0)
    axes.set_title(caption, fontsize=6)
    axes.axis("off")


def _row(entry: GalleryEntry) -> list[tuple[SliceView, str]]:
    cells = []
    for rank, patch in enumerate(([entry.source] if entry.source else []) + entry.nearest):
        name = "source" if rank == 0 and entry.source else f"#{rank if entry.source else rank + 1}"
        for view in patch.views:
            cells.append((view, f"{name} {patch.sample_id}\nd={patch.distance:.3g} {view.title}"))
    return cells


def gallery_figure(entries: Sequence[GalleryEntry]) -> Figure:
    """One row per prototype: source patch, then nearest patches (three slices each in 3D)."""
    rows = [_row(e) for e in entries]
    columns = max((len(r) for r in rows), default=1) or 1
    figure, axes = plt.subplots(max(1, len(rows)), columns, figsize=(1.6 * columns, 1.8 * max(1, len(rows))),
                                squeeze=False)
    for r, (entry, cells) in enumerate(zip(entries, rows, strict=True)):
        for c in range(columns):
            axes[r, c].axis("off")
            if c < len(cells):
                _draw(axes[r, c], *cells[c])
        status = "" if entry.active else " (pruned)"
        axes[r, 0].text(-0.1, 0.5, f"P{entry.prototype}\n{entry.class_name}{status}", transform=axes[r, 0].transAxes,
                        ha="right", va="center", fontsize=7)
    figure.tight_layout()
    return figure


def prototype_figure(entry: GalleryEntry) -> Figure:
    """The gallery row of one prototype as its own figure."""
    return gallery_figure([entry])


def save_gallery(entries: Sequence[GalleryEntry], folder: str | Path) -> list[Path]:
    """Write ``prototype_<p>.png`` per prototype and ``gallery.png`` with every row; return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in entries:
        figure = prototype_figure(entry)
        written.append(folder / f"prototype_{entry.prototype:03d}.png")
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)
    figure = gallery_figure(entries)
    written.append(folder / "gallery.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)
    return written

