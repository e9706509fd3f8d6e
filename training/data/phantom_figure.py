"""A figure of phantom samples: 2D scans with their lesion outline, and 3D scans as orthogonal slices.

Run ``python -m pellucid.training.data.phantom_figure --out docs/phantom_samples.png``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pellucid.training.data.phantom import (
    LESION_TYPE_NAMES,
    PHANTOM_CLASSES,
    PHANTOM_CONCEPTS,
    PhantomConfig,
    PhantomGenerator,
    PhantomSample,
)

_DISPLAY_RANGE = (0.0, 2.0)
_LESION_COLOR, _MARKER_COLOR = "#ff3b30", "#ffd60a"
# One 2D example of each of these lesion types (0 = no lesion), in this order.
_TYPES_2D = (0, 1, 2, 3, 4, 5, 6, 8)
_TYPES_3D = (4, 7)


def describe_sample(sample: PhantomSample) -> str:
    """Three short title lines: class and lesion type, size and contrast with units, marker."""
    lesion = LESION_TYPE_NAMES[sample.lesion_type] if sample.lesion_type else "no lesion"
    lines = [f"{PHANTOM_CLASSES[sample.label]}: {lesion}"]
    if sample.lesion_type:
        diameter, contrast = PHANTOM_CONCEPTS[0], PHANTOM_CONCEPTS[1]
        lines.append(
            f"diameter {sample.concepts[0]:.1f} {diameter.unit}, contrast {sample.concepts[1]:.2f} {contrast.unit}"
        )
    lines.append("marker present" if sample.shortcut_present else "no marker")
    return "\n".join(lines)


def _find_samples(
    generator: PhantomGenerator, lesion_types: Sequence[int], min_diameter_mm: float = 0.0, search: int = 1000
) -> list[PhantomSample]:
    """The first train sample of each lesion type at least ``min_diameter_mm`` wide (deterministic for a seed)."""
    found: dict[int, PhantomSample] = {}
    for index in range(search):
        sample = generator.sample("train", index)
        large_enough = sample.lesion_type == 0 or sample.concepts[0] >= min_diameter_mm
        if sample.lesion_type in lesion_types and sample.lesion_type not in found and large_enough:
            found[sample.lesion_type] = sample
        if len(found) == len(lesion_types):
            break
    return [found[t] for t in lesion_types if t in found]


def _show(
    axes: Axes, image: np.ndarray, mask: np.ndarray, marker: np.ndarray | None, aspect: float, title: str
) -> None:
    axes.imshow(image, cmap="gray", vmin=_DISPLAY_RANGE[0], vmax=_DISPLAY_RANGE[1], aspect=aspect)
    if mask.any():
        axes.contour(mask, levels=[0.5], colors=_LESION_COLOR, linewidths=0.8)
    if marker is not None and marker.any():
        axes.contour(marker, levels=[0.5], colors=_MARKER_COLOR, linewidths=0.8)
    axes.set_title(title, fontsize=7)
    axes.set_xticks([])
    axes.set_yticks([])


def make_phantom_figure(seed: int = 0, shortcut_strength: float = 0.9) -> Figure:
    """Build the sample figure: eight 2D scans (two rows) and two 3D scans (slices and a projection).

    Args:
        seed: Phantom seed.
        shortcut_strength: ``c`` of the train split's shortcut marker (shown in yellow).

    Returns:
        The matplotlib figure (no pyplot state is touched).
    """
    shortcut = {"train": shortcut_strength}
    generator_2d = PhantomGenerator(PhantomConfig(spatial_dims=2, shortcut=shortcut), seed=seed)
    generator_3d = PhantomGenerator(PhantomConfig(spatial_dims=3, shortcut=shortcut), seed=seed)
    samples_2d = _find_samples(generator_2d, _TYPES_2D, min_diameter_mm=11.0)
    samples_3d = _find_samples(generator_3d, _TYPES_3D, min_diameter_mm=14.0)
    figure = Figure(figsize=(12, 13), dpi=110)
    grid = figure.add_gridspec(4, 4, hspace=0.45, wspace=0.08)
    for position, sample in enumerate(samples_2d):
        axes = figure.add_subplot(grid[position // 4, position % 4])
        marker = sample.confounder_mask[0] if sample.confounder_mask is not None else None
        _show(axes, sample.image[0], sample.mask[0], marker, 1.0, describe_sample(sample))
    spacing = generator_3d.spacing_mm
    for row, sample in enumerate(samples_3d, start=2):
        center = np.floor(sample.lesion_centers_mm[0] / spacing).astype(int)
        marker = sample.confounder_mask[0] if sample.confounder_mask is not None else np.zeros_like(sample.mask[0])
        views = [  # (image, mask, marker, aspect = row spacing / column spacing, name)
            (sample.image[0, center[0]], sample.mask[0, center[0]], None, spacing[1] / spacing[2], "axial"),
            (sample.image[0, :, center[1]], sample.mask[0, :, center[1]], None, spacing[0] / spacing[2], "coronal"),
            (
                sample.image[0, :, :, center[2]],
                sample.mask[0, :, :, center[2]],
                None,
                spacing[0] / spacing[1],
                "sagittal",
            ),
            (
                sample.image[0].max(axis=0),
                sample.mask[0].max(axis=0),
                marker.max(axis=0),
                spacing[1] / spacing[2],
                "MIP",
            ),
        ]
        for column, (image, mask, view_marker, aspect, name) in enumerate(views):
            title = f"3D {name}" + (" through the lesion center" if name != "MIP" else " (max. intensity projection)")
            if column == 0:
                title = describe_sample(sample) + "\n" + title
            _show(figure.add_subplot(grid[row, column]), image, mask, view_marker, aspect, title)
    figure.suptitle(
        f"Phantom samples (seed {seed}): lesion mask in red, shortcut marker in yellow"
        f" (train split, c = {shortcut_strength})",
        fontsize=10,
    )
    return figure


def main(argv: Sequence[str] | None = None) -> None:
    """Write the figure to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/phantom_samples.png"), help="PNG file to write")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    arguments = parser.parse_args(argv)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    make_phantom_figure(seed=arguments.seed).savefig(arguments.out, bbox_inches="tight")
    print(f"wrote {arguments.out}")


if __name__ == "__main__":
    main()
