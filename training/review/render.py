"""Pictures for the review page: small RGB arrays as PNG data URIs, drawn with numpy (no figure, fast per request).

- :func:`sample_views`: a sample's image and its evidence map on top, with the lesion (cyan) and shortcut-marker
  (lime) outlines. 2D: one view. 3D: the axial slice through the evidence peak and the one through the lesion centre
  when a lesion mask exists, else the three orthogonal slices through the peak.
- :func:`map_views`: one map (e.g. a prototype's activation on the sample), 3D as the slice through its peak.
- :func:`join_views` / :func:`png_data_uri`: side-by-side panels, PNG bytes and ``data:`` URIs.

The heat map uses the report's colour map (:data:`pellucid.training.outputs.figures.HEATMAP`) and the grey image is
:func:`~pellucid.training.outputs.figures.display_image`, so the page and the report card look alike.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image

from pellucid.training.outputs.figures import AXIS_NAMES, HEATMAP, display_image, peak_index

ALPHA = 0.55  # as the report's overlays
OUTLINES = {"mask": (0, 255, 255), "confounder": (0, 255, 0)}  # lesion cyan, shortcut marker lime


@dataclass
class View:
    """One 2D view of a sample: a caption, the grey image and the image with its evidence on top (RGB uint8)."""

    caption: str
    image: np.ndarray
    overlay: np.ndarray | None


def _numpy(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _squeeze(value: Any, rank: int) -> np.ndarray | None:
    array = _numpy(value)
    if array is None:
        return None
    return array[0] if array.ndim == rank + 1 else array


def grey_rgb(grey: np.ndarray, low: float, high: float) -> np.ndarray:
    """(h, w) intensities -> (h, w, 3) floats in [0, 1], scaled by ``low``/``high`` (the whole volume's range)."""
    scaled = np.clip((grey - low) / max(high - low, 1e-12), 0.0, 1.0)
    return np.repeat(scaled[..., None], 3, axis=2)


def heat_rgb(grey: np.ndarray, evidence: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """(h, w, 3) grey image with (h, w) evidence in [0, 1] blended on top in the report's colour map.

    The opacity grows with the evidence (from a third of ``alpha`` to ``alpha``), so the anatomy stays readable where
    the map is low.
    """
    evidence = np.clip(np.nan_to_num(evidence), 0.0, 1.0)
    heat = colormaps[HEATMAP](evidence)[..., :3]
    opacity = alpha * (1 + 2 * evidence[..., None]) / 3
    return (1 - opacity) * grey + opacity * heat


def outline(mask: np.ndarray) -> np.ndarray:
    """(h, w) bool: the pixels of ``mask > 0.5`` that touch a pixel outside it (4-neighbourhood)."""
    inside = mask > 0.5
    padded = np.pad(inside, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside & ~interior


def _draw_outlines(rgb: np.ndarray, layers: dict[str, np.ndarray | None]) -> np.ndarray:
    out = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    for key, colour in OUTLINES.items():
        layer = layers.get(key)
        if layer is not None and layer.max() > 0.5:
            out[outline(layer)] = colour
    return out


def _slice(layer: np.ndarray | None, axis: int, index: int) -> np.ndarray | None:
    return None if layer is None else np.take(layer, index, axis=axis)


def lesion_centre(mask: np.ndarray | None) -> tuple[int, ...] | None:
    """The rounded centre of mass of ``mask > 0.5`` (``None`` without a mask or with an empty one)."""
    if mask is None or not (mask > 0.5).any():
        return None
    return tuple(int(round(float(c.mean()))) for c in np.nonzero(mask > 0.5))


def _view(caption: str, grey: np.ndarray, layers: dict[str, np.ndarray | None], low: float, high: float) -> View:
    base = grey_rgb(grey, low, high)
    evidence = layers.get("evidence")
    overlay = None if evidence is None else _draw_outlines(heat_rgb(base, evidence), layers)
    return View(caption, _draw_outlines(base, layers), overlay)


def sample_views(image: Any, evidence: Any = None, mask: Any = None, confounder: Any = None) -> list[View]:
    """The views of one sample (see the module docstring).

    Args:
        image: (C, *S) input.
        evidence: (*S) evidence in [0, 1] at input resolution, or ``None``.
        mask: (*S) or (1, *S) lesion mask, or ``None``.
        confounder: (*S) or (1, *S) shortcut-marker mask, or ``None``.
    """
    grey = display_image(image)
    layers = {"evidence": _numpy(evidence), "mask": _squeeze(mask, grey.ndim),
              "confounder": _squeeze(confounder, grey.ndim)}
    low, high = float(grey.min()), float(grey.max())
    if grey.ndim == 2:
        return [_view("", grey, layers, low, high)]
    peak = peak_index(layers["evidence"], grey.shape)
    centre = lesion_centre(layers["mask"])
    if centre is not None:
        cuts = [("evidence peak", peak[0]), ("lesion centre", centre[0])]
        return [_view(f"{what}: {AXIS_NAMES[0]} slice {index}", grey[index],
                      {key: _slice(layer, 0, index) for key, layer in layers.items()}, low, high)
                for what, index in cuts]
    return [_view(f"evidence peak: {name} slice {peak[axis]}", np.take(grey, peak[axis], axis=axis),
                  {key: _slice(layer, axis, peak[axis]) for key, layer in layers.items()}, low, high)
            for axis, name in enumerate(AXIS_NAMES)]


def map_views(image: Any, activation: Any) -> list[View]:
    """One map on one image: 2D as is, 3D as the axial slice through the map's peak."""
    grey = display_image(image)
    activation = _numpy(activation)
    low, high = float(grey.min()), float(grey.max())
    if grey.ndim == 2:
        return [_view("", grey, {"evidence": activation}, low, high)]
    peak = peak_index(activation, grey.shape)
    return [_view(f"{AXIS_NAMES[0]} slice {peak[0]}", grey[peak[0]], {"evidence": activation[peak[0]]}, low, high)]


def join_views(pictures: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
    """(h, w, 3) uint8 pictures side by side on white, top-aligned, ``gap`` pixels apart."""
    height = max(p.shape[0] for p in pictures)
    width = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    column = 0
    for picture in pictures:
        canvas[: picture.shape[0], column: column + picture.shape[1]] = picture
        column += picture.shape[1] + gap
    return canvas


def enlarge(rgb: np.ndarray, height: int) -> np.ndarray:
    """Repeat pixels (nearest neighbour) by the integer factor that brings ``rgb`` closest to ``height`` rows."""
    factor = max(1, round(height / max(1, rgb.shape[0])))
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def png_bytes(rgb: np.ndarray) -> bytes:
    """(h, w, 3) uint8 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def png_data_uri(rgb: np.ndarray) -> str:
    """(h, w, 3) uint8 -> ``data:image/png;base64,...`` (an ``<img src>`` needing no second request)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")
