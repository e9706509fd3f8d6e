"""Figures of explanations, shared by the W&B logger and the report card (matplotlib, Agg canvas, no window).

- :func:`overlay_figure`: the image, its evidence heatmap and the ground-truth contours (lesion mask, shortcut
  marker); 3D inputs show the three orthogonal slices through the evidence peak.
- :func:`prototype_figure`: where the most similar prototypes activate in one image.
- :func:`concept_rows` / :func:`concept_table_figure`: predicted versus true concepts, with units.
- :func:`curve_figure`: deletion and intervention curves; :func:`sanity_figure`: the randomisation cascade.
- :func:`figure_png` / :func:`figure_rgb`: a figure as PNG bytes (reports) or an RGB array (W&B images).

Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas, never through ``pyplot``'s global state,
so they are safe in callbacks and threads and need no display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pellucid.models.concepts import ConceptSpec

HEATMAP = "inferno"
AXIS_NAMES = ("axial", "coronal", "sagittal")  # slices across axis 0, 1, 2 of a (D, H, W) volume


def _array(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def figure_rgb(figure: Figure) -> np.ndarray:
    """The figure as an (H, W, 3) uint8 array."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def display_image(image: Any) -> np.ndarray:
    """(C, *S) image -> (*S) grey values: the single channel, else the channel mean."""
    array = _array(image)
    return array[0] if array.shape[0] == 1 else array.mean(axis=0)


def peak_index(evidence: np.ndarray | None, shape: Sequence[int]) -> tuple[int, ...]:
    """Index of the evidence map's maximum (the volume's centre without a map)."""
    if evidence is None or not np.isfinite(evidence).any() or float(np.nanmax(evidence)) <= 0:
        return tuple(n // 2 for n in shape)
    return tuple(int(i) for i in np.unravel_index(int(np.nanargmax(evidence)), evidence.shape))


def _views(image: np.ndarray, layers: Mapping[str, np.ndarray | None],
           evidence: np.ndarray | None) -> list[tuple[str, np.ndarray, dict[str, np.ndarray | None]]]:
    """(title, 2D image, 2D layers) per view: one for 2D, three orthogonal slices through the peak for 3D."""
    if image.ndim == 2:
        return [("", image, dict(layers))]
    index = peak_index(evidence, image.shape)
    views = []
    for axis, name in enumerate(AXIS_NAMES):
        sliced = {key: None if layer is None else np.take(layer, index[axis], axis=axis)
                  for key, layer in layers.items()}
        views.append((f"{name} slice {index[axis]}", np.take(image, index[axis], axis=axis), sliced))
    return views


def overlay_figure(image: Any, evidence: Any = None, mask: Any = None, confounder: Any = None,
                   title: str = "") -> Figure:
    """The image (with ground-truth contours) beside its evidence heatmap; 3D: three slices through the peak.

    Args:
        image: (C, *S) input.
        evidence: (*S) evidence map in [0, 1] at input resolution, or ``None``.
        mask: (*S) or (1, *S) lesion mask (contour in cyan), or ``None``.
        confounder: (*S) or (1, *S) shortcut-marker mask (contour in lime), or ``None``.
        title: Figure title.
    """
    grey = display_image(image)
    layers = {"evidence": _array(evidence), "mask": _squeeze(mask, grey.ndim),
              "confounder": _squeeze(confounder, grey.ndim)}
    views = _views(grey, layers, layers["evidence"])
    figure = Figure(figsize=(4.4, 2.3 * len(views)), layout="constrained")
    axes = figure.subplots(len(views), 2, squeeze=False)
    for row, (name, picture, sliced) in enumerate(views):
        for column in range(2):
            axis = axes[row, column]
            axis.imshow(picture, cmap="gray", interpolation="nearest")
            if column == 1 and sliced["evidence"] is not None:
                shown = axis.imshow(sliced["evidence"], cmap=HEATMAP, alpha=0.55, vmin=0.0, vmax=1.0,
                                    interpolation="bilinear")
                figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02)
            for key, colour in (("mask", "cyan"), ("confounder", "lime")):
                layer = sliced[key]
                if layer is not None and layer.max() > 0 and layer.min() < layer.max():
                    axis.contour(layer > 0.5, levels=[0.5], colors=colour, linewidths=0.8)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_title(f"image {name}".strip(), fontsize=8)
        axes[row, 1].set_title("evidence" if sliced["evidence"] is not None else "no localization", fontsize=8)
    figure.suptitle(title, fontsize=9)
    return figure


def _squeeze(value: Any, rank: int) -> np.ndarray | None:
    array = _array(value)
    if array is None:
        return None
    return array[0] if array.ndim == rank + 1 else array


def _upsample(maps: np.ndarray, size: Sequence[int]) -> np.ndarray:
    tensor = torch.as_tensor(maps, dtype=torch.float32)[None]
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(tensor, size=tuple(size), mode=mode, align_corners=False)[0].numpy()


def prototype_figure(image: Any, prototype_maps: Any, similarity: Any, top_k: int = 3, title: str = "") -> Figure:
    """Where the ``top_k`` most similar prototypes activate in one image (3D: slice through each map's peak).

    Args:
        image: (C, *S) input.
        prototype_maps: (P, *s) similarity maps at feature resolution.
        similarity: (P,) similarity per prototype.
        top_k: Prototypes shown.
        title: Figure title.
    """
    grey = display_image(image)
    maps, scores = _array(prototype_maps), _array(similarity)
    chosen = np.argsort(-scores)[: max(1, min(top_k, scores.shape[0]))]
    upsampled = _upsample(maps[chosen], grey.shape)
    figure = Figure(figsize=(2.2 * len(chosen), 2.5), layout="constrained")
    axes = figure.subplots(1, len(chosen), squeeze=False)[0]
    for axis, index, activation in zip(axes, chosen, upsampled, strict=True):
        low, high = float(activation.min()), float(activation.max())
        scaled = (activation - low) / (high - low) if high > low else np.zeros_like(activation)
        picture, layer = grey, scaled
        if grey.ndim == 3:
            peak = peak_index(scaled, grey.shape)
            picture, layer = np.take(grey, peak[0], axis=0), np.take(scaled, peak[0], axis=0)
        axis.imshow(picture, cmap="gray", interpolation="nearest")
        axis.imshow(layer, cmap=HEATMAP, alpha=0.55, vmin=0, vmax=1, interpolation="bilinear")
        axis.set_title(f"prototype {int(index)}\nsimilarity {float(scores[index]):.3g}", fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title, fontsize=9)
    return figure


def concept_rows(predicted: Any, true: Any, specs: Sequence[ConceptSpec]) -> list[dict[str, Any]]:
    """One row per concept: name, unit, kind, predicted (probability or value in unit) and true value (or None).

    Args:
        predicted: (M,) concept logits as the model returns them (binary: logit, continuous: value in unit).
        true: (M,) annotations in the same order (NaN = not annotated), or ``None``.
        specs: The M concept specifications.
    """
    logits = _array(predicted)
    truth = _array(true)
    if logits.shape[0] != len(specs):
        raise ValueError(f"concept_rows: {logits.shape[0]} predicted concepts but {len(specs)} specifications")
    rows = []
    for index, spec in enumerate(specs):
        value = float(logits[index])
        if spec.kind == "binary":
            value = 1.0 / (1.0 + math.exp(-value))
        known = truth is not None and index < truth.shape[0] and not math.isnan(float(truth[index]))
        rows.append({"concept": spec.name, "unit": spec.unit if spec.kind == "continuous" else "probability",
                     "kind": spec.kind, "predicted": value, "true": float(truth[index]) if known else None})
    return rows


def concept_table_figure(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """A table figure of :func:`concept_rows`."""
    cells = [[row["concept"], row["unit"] or "", f"{row['predicted']:.3g}",
              "—" if row["true"] is None else f"{row['true']:.3g}"] for row in rows]
    figure = Figure(figsize=(4.8, 0.4 + 0.28 * max(1, len(cells))), layout="constrained")
    axis = figure.subplots()
    axis.axis("off")
    table = axis.table(cellText=cells or [["(no concepts)", "", "", ""]],
                       colLabels=["concept", "unit", "predicted", "true"], loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.2)
    axis.set_title(title, fontsize=9)
    return figure


def curve_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
                 title: str = "") -> Figure:
    """Line plot of named ``(x, y)`` curves (deletion, intervention)."""
    figure = Figure(figsize=(4.2, 2.8), layout="constrained")
    axis = figure.subplots()
    for label, (x, y) in curves.items():
        axis.plot(list(x), list(y), marker="o", markersize=3, label=label)
    axis.set_xlabel(xlabel, fontsize=8)
    axis.set_ylabel(ylabel, fontsize=8)
    axis.tick_params(labelsize=7)
    axis.grid(alpha=0.3)
    if curves:
        axis.legend(fontsize=7)
    axis.set_title(title, fontsize=9)
    return figure


def sanity_figure(steps: Sequence[Mapping[str, Any]], image: Any, original: Any, randomized: Any,
                  threshold: float, title: str = "") -> Figure:
    """The randomisation cascade: similarity per step, and one image's map before and after.

    Args:
        steps: ``SanityResult.to_dict()["steps"]``.
        image: (C, *S) one input image.
        original: (*S) its original evidence map.
        randomized: (*S) its map after the whole cascade.
        threshold: The "unchanged" Spearman threshold.
        title: Figure title.
    """
    grey, before, after = display_image(image), _array(original), _array(randomized)
    if grey.ndim == 3:
        peak = peak_index(before, grey.shape)
        grey, before, after = (np.take(a, peak[0], axis=0) for a in (grey, before, after))
    figure = Figure(figsize=(8.4, 2.6), layout="constrained")
    axes = figure.subplots(1, 3, width_ratios=[1.6, 1, 1])
    x = list(range(1, len(steps) + 1))
    axes[0].plot(x, [s["spearman"] for s in steps], marker="o", label="Spearman")
    axes[0].plot(x, [s["ssim"] for s in steps], marker="s", label="SSIM")
    axes[0].axhline(threshold, color="grey", linestyle="--", linewidth=0.8, label="unchanged above")
    axes[0].set_xlabel("layer groups randomised (top first)", fontsize=8)
    axes[0].set_ylabel("similarity to original", fontsize=8)
    axes[0].set_ylim(-1.05, 1.05)
    axes[0].tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    for axis, layer, name in ((axes[1], before, "trained model"), (axes[2], after, "all layers randomised")):
        axis.imshow(grey, cmap="gray", interpolation="nearest")
        axis.imshow(layer, cmap=HEATMAP, alpha=0.55, vmin=0, vmax=1, interpolation="bilinear")
        axis.set_title(name, fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title, fontsize=9)
    return figure
