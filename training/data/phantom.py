"""The phantom benchmark: synthetic 2D and 3D scans with ground truth for every interpretability element.

Each sample is a body (ellipse/ellipsoid of textured tissue) with zero, one or more lesions whose mask, physical
attributes (diameter in mm, contrast, lobulated outline, spicules, calcifications), lesion type and label are known,
and optionally a bright corner marker (a shortcut) whose correlation with the label is set per split. One code path
serves 2D and 3D: all geometry is in physical coordinates (mm), so anisotropic spacing keeps lesions round in mm.

Sample ``index`` of ``split`` is a pure function of ``(seed, split, index)``: random access, batching and worker
count never change its bytes. The label comes from :data:`LABEL_RULE`, the single source of truth for the rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pellucid.training.data.phantom_draws import count_in, scaled, smooth_noise_bank, spread_unit_vectors, unit_vectors
from pellucid.training.data.phantom_rule import (  # noqa: F401  (re-exported: the phantom's vocabulary)
    CALCIFIED,
    CONTRAST,
    DIAMETER,
    IRREGULAR,
    LABEL_RULE,
    LESION_TYPE_NAMES,
    PHANTOM_CLASSES,
    PHANTOM_CONCEPTS,
    SPICULATED,
    SPLITS,
    PointsLabelRule,
    lesion_type_from_concepts,
)

if TYPE_CHECKING:
    from pellucid.training.data.phantom_twins import PhantomTwin

_BODY_SEMI_AXIS_RANGE = (0.35, 0.45)  # fraction of the field of view, per axis
_BODY_CENTER_JITTER = 0.04  # fraction of the field of view, per axis
_TISSUE_BASE, _TEXTURE_AMPLITUDE, _TEXTURE_SIGMA_MM = 0.4, 0.1, 3.0
_P_ATTRIBUTE = 0.5  # P(irregular), P(spiculated), P(calcified), drawn independently
# Irregular = lobulated: a core ball of 0.7 R plus 3-5 lobe balls (radius 0.45-0.65 R) centered 0.65-0.85 R out.
_LOBED_CORE_FRACTION, _LOBE_COUNT_RANGE = 0.7, (3, 5)
_LOBE_OFFSET_RANGE, _LOBE_RADIUS_RANGE = (0.65, 0.85), (0.45, 0.65)  # in units of R
_SPIKE_COUNT_RANGE, _SPIKE_REACH_RANGE = (8, 12), (1.5, 1.8)  # reach in units of the core radius R
_CALCIFICATION_COUNT_RANGE, _CALCIFICATION_INTENSITY_RANGE = (2, 4), (0.8, 1.0)
_MARKER_INTENSITY = 1.2
_MIN_IMAGE_SIZE = 16


def _per_axis(name: str, value: Any, default: float, spatial_dims: int, integer: bool) -> tuple[Any, ...]:
    """Normalise a scalar or per-axis sequence to a tuple of ``spatial_dims`` positive numbers."""
    if value is None:
        value = default
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if len(values) == 1:
        values = values * spatial_dims
    numeric = all(isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) for v in values)
    if len(values) != spatial_dims or not numeric or any(v <= 0 for v in values):
        raise ValueError(f"{name} must be a positive number or {spatial_dims} positive numbers, got {value!r}")
    if integer and any(int(v) != v for v in values):
        raise ValueError(f"{name} must hold integers, got {value!r}")
    return tuple(int(v) for v in values) if integer else tuple(float(v) for v in values)


def _check_range(name: str, value: Any, low: float = 0.0) -> tuple[float, float]:
    try:
        start, stop = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not low < start < stop:
        raise ValueError(f"{name} must be positive and increasing (low < high), got {value!r}")
    return start, stop


def _spike_halfwidth_mm(radius_mm: float, max_spacing_mm: float) -> float:
    """Half-width of a spicule at its base: thin, yet at least about one voxel wide."""
    return max(0.1 * radius_mm, 1.0 * max_spacing_mm)


def _lesion_extent_mm(radius_mm: float, reach: float, max_spacing_mm: float) -> float:
    """Radius of a ball that holds the whole lesion (core, lobes, spikes); ``reach`` in units of R."""
    return radius_mm * reach + _spike_halfwidth_mm(radius_mm, max_spacing_mm)


def _marker_size(image_size: tuple[int, ...]) -> int:
    return max(3, round(min(image_size) / 16))


@dataclass(frozen=True)
class PhantomConfig:
    """Everything that shapes the phantom; validated on construction.

    Args:
        spatial_dims: 2 or 3.
        image_size: Voxels per axis (one int or one per axis); default 64 (2D) or 32 (3D).
        spacing_mm: Voxel size per axis in mm (one float or one per axis); default 1.0 (2D) or 2.0 (3D).
        diameter_range_mm: Range of the lesion core diameter 2R in mm (uniform).
        contrast_range: Range of the intensity a lesion adds (uniform).
        p_normal: Probability of a scan without lesion.
        max_lesions: Lesions in an abnormal scan are drawn uniformly from 1..max_lesions.
        noise_std: Standard deviation of the additive Gaussian noise.
        shortcut: Per split ``c`` in [0, 1]: P(marker | malignant) = c, P(marker | not malignant) = 1 - c;
            splits left out get 0.5 (marker independent of the label); ``None`` disables the marker.
    """

    spatial_dims: int = 2
    image_size: int | tuple[int, ...] | None = None
    spacing_mm: float | tuple[float, ...] | None = None
    diameter_range_mm: tuple[float, float] = (4.0, 20.0)
    contrast_range: tuple[float, float] = (0.3, 1.0)
    p_normal: float = 1.0 / 3.0
    max_lesions: int = 1
    noise_std: float = 0.04
    shortcut: dict[str, float] | None = None

    def __post_init__(self) -> None:
        dims = self.spatial_dims
        if isinstance(dims, bool) or dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {dims!r}")
        size = _per_axis("image_size", self.image_size, 64 if dims == 2 else 32, dims, integer=True)
        if min(size) < _MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE} voxels per axis, got {self.image_size!r}")
        spacing = _per_axis("spacing_mm", self.spacing_mm, 1.0 if dims == 2 else 2.0, dims, integer=False)
        diameter_range = _check_range("diameter_range_mm", self.diameter_range_mm)
        contrast_range = _check_range("contrast_range", self.contrast_range)
        if not 0.0 <= self.p_normal <= 1.0:
            raise ValueError(f"p_normal must be in [0, 1], got {self.p_normal!r}")
        if isinstance(self.max_lesions, bool) or not isinstance(self.max_lesions, int) or self.max_lesions < 1:
            raise ValueError(f"max_lesions must be an integer >= 1, got {self.max_lesions!r}")
        if not self.noise_std >= 0.0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std!r}")
        fov = [n * s for n, s in zip(size, spacing, strict=True)]
        smallest_body_semi_axis = _BODY_SEMI_AXIS_RANGE[0] * min(fov)
        largest_extent = _lesion_extent_mm(diameter_range[1] / 2, _SPIKE_REACH_RANGE[1], max(spacing))
        if largest_extent >= 0.95 * smallest_body_semi_axis:
            raise ValueError(
                f"image_size {size} at spacing_mm {spacing} (field of view {min(fov):g} mm) is too small for the"
                f" largest lesion: diameter_range_mm upper bound {diameter_range[1]:g} mm reaches"
                f" {largest_extent:.1f} mm from its center, a body semi-axis may be {smallest_body_semi_axis:.1f} mm;"
                " enlarge image_size or spacing_mm, or lower diameter_range_mm"
            )
        shortcut = None
        if self.shortcut is not None:
            if not isinstance(self.shortcut, Mapping):
                raise ValueError(f"shortcut must be a dict split -> probability or None, got {self.shortcut!r}")
            shortcut = {}
            for split, strength in self.shortcut.items():
                if split not in SPLITS:
                    raise ValueError(f"shortcut keys must be among {SPLITS}, got {split!r}")
                if not 0.0 <= float(strength) <= 1.0:
                    raise ValueError(f"shortcut[{split!r}] must be in [0, 1], got {strength!r}")
                shortcut[split] = float(strength)
            # The marker box must lie outside every possible body (worst case: body shifted towards the corner).
            marker_far_edge = [(1 + _marker_size(size)) * s for s in spacing]
            body_reach = [(0.5 - _BODY_CENTER_JITTER) * f for f in fov]
            normalised = sum(
                ((r - e) / (_BODY_SEMI_AXIS_RANGE[1] * f)) ** 2
                for r, e, f in zip(body_reach, marker_far_edge, fov, strict=True)
            )
            if normalised <= 1.0:
                raise ValueError(f"image_size {size} is too small to keep the shortcut marker outside the body")
        normalised_fields = {"image_size": size, "spacing_mm": spacing, "diameter_range_mm": diameter_range}
        normalised_fields |= {"contrast_range": contrast_range, "p_normal": float(self.p_normal), "shortcut": shortcut}
        for name, value in (normalised_fields | {"noise_std": float(self.noise_std)}).items():
            object.__setattr__(self, name, value)


@dataclass
class PhantomSample:
    """One generated scan and its ground truth (numpy arrays; ``S`` is the image size).

    Attributes:
        image: (1, *S) float32 intensities, mostly in [0, 1.5]; calcification dots reach ~2.7.
        mask: (1, *S) float32 union of all lesion masks (core, lobes and spikes), in {0, 1}.
        body_mask: (1, *S) bool, the body the lesions lie in.
        concepts: (5,) float32 concepts of the index lesion (order of :data:`PHANTOM_CONCEPTS`); zeros if none.
        label: Class index into :data:`PHANTOM_CLASSES`, from :data:`LABEL_RULE`.
        lesion_type: Index into :data:`LESION_TYPE_NAMES`.
        shortcut_present: Whether the shortcut marker is drawn.
        confounder_mask: (1, *S) float32 marker mask (zeros when absent); ``None`` when the shortcut is disabled.
        lesion_concepts: (L, 5) float32 concepts of every lesion, index lesion first.
        lesion_centers_mm: (L, spatial_dims) float32 lesion centers in mm (voxel i spans [i, i+1) * spacing).
        id: Sample id, e.g. ``"phantom2d-train-000042"``.
    """

    image: np.ndarray
    mask: np.ndarray
    body_mask: np.ndarray
    concepts: np.ndarray
    label: int
    lesion_type: int
    shortcut_present: bool
    confounder_mask: np.ndarray | None
    lesion_concepts: np.ndarray
    lesion_centers_mm: np.ndarray
    id: str


@dataclass
class _Lesion:
    center_mm: np.ndarray
    radius_mm: float
    extent_mm: float  # a ball of this radius around the center holds the whole lesion
    concepts: list[float]
    lobe_offsets_mm: np.ndarray  # (J, n) lobe centers relative to the lesion center; J = 0 for round lesions
    lobe_radii_mm: np.ndarray
    spike_directions: np.ndarray  # (K, n) unit vectors; K = 0 without spicules
    spike_reach_mm: np.ndarray
    calcification_count: int


class PhantomGenerator:
    """Generates phantom samples; sample ``index`` of ``split`` depends only on ``(seed, split, index)``.

    Args:
        config: The phantom settings; default ``PhantomConfig()`` (2D, 64x64, 1 mm).
        seed: Non-negative integer seed.
    """

    def __init__(self, config: PhantomConfig | None = None, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.config = config if config is not None else PhantomConfig()
        self.seed = int(seed)
        dims, self.shape = self.config.spatial_dims, self.config.image_size
        self.spacing_mm = np.asarray(self.config.spacing_mm, dtype=np.float64)
        self.field_of_view_mm = self.spacing_mm * np.asarray(self.shape)
        self._max_spacing_mm = float(self.spacing_mm.max())
        self._crop_choices = np.asarray(self.shape) + 1  # texture crop offsets per axis
        # Voxel centers in mm along each axis (voxel i spans [i, i + 1) * spacing), 1-D and shaped to broadcast.
        self._axis_coords_mm = [
            ((np.arange(n) + 0.5) * s).astype(np.float32) for n, s in zip(self.shape, self.spacing_mm, strict=True)
        ]
        self._grid_coords_mm = [self._along_axis(x, a) for a, x in enumerate(self._axis_coords_mm)]
        texture_rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1000]))
        self._textures = smooth_noise_bank(texture_rng, self.shape, self.config.spacing_mm, 16 if dims == 2 else 4,
                                           _TEXTURE_SIGMA_MM)
        width = _marker_size(self.shape)
        relative = np.indices((width,) * dims)
        self._marker = np.zeros(self.shape, dtype=bool)  # an "L" tag one voxel in from the first corner
        self._marker[(slice(1, 1 + width),) * dims] = (relative[-1] == 0) | (relative[-2] == width - 1)
        eye = np.eye(dims, dtype=int)
        self._dot_stencil = np.concatenate([np.zeros((1, dims), int), eye, -eye])  # a voxel and its face neighbours

    def _along_axis(self, values: np.ndarray, axis: int) -> np.ndarray:
        return values.reshape([-1 if a == axis else 1 for a in range(self.config.spatial_dims)])

    def sample(self, split: str, index: int) -> PhantomSample:
        """Generate sample ``index`` of ``split`` (one of :data:`SPLITS`)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
            raise ValueError(f"index must be a non-negative integer, got {index!r}")
        cfg, dims = self.config, self.config.spatial_dims
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS.index(split), int(index)]))
        image, body, body_center, body_semi_axes = self._draw_body(rng)
        mask = np.zeros(self.shape, dtype=bool)
        lesions = self._draw_lesions(rng, body_center, body_semi_axes)
        for lesion in lesions:
            self._paint_lesion(rng, lesion, image, mask)
        lesion_concepts = np.asarray([lesion.concepts for lesion in lesions], dtype=np.float32).reshape(-1, 5)
        lesion_centers = np.asarray([lesion.center_mm for lesion in lesions], dtype=np.float32).reshape(-1, dims)
        if len(lesions) > 1:  # the index lesion (most points, then largest) comes first and decides the label
            order = np.lexsort((-lesion_concepts[:, DIAMETER], -LABEL_RULE.points(lesion_concepts)))
            lesion_concepts, lesion_centers = lesion_concepts[order], lesion_centers[order]
        concepts = lesion_concepts[0].copy() if lesions else np.zeros(5, dtype=np.float32)
        label = int(LABEL_RULE.label_from_concepts(concepts))
        marker_draw = rng.random()  # always drawn: enabling the shortcut changes nothing but the marker voxels
        confounder_mask, shortcut_present = None, False
        if cfg.shortcut is not None:
            strength = cfg.shortcut.get(split, 0.5)
            shortcut_present = bool(marker_draw < (strength if label == 2 else 1.0 - strength))
            if shortcut_present:
                image[self._marker] = _MARKER_INTENSITY
            marker = self._marker if shortcut_present else np.zeros(self.shape, dtype=bool)
            confounder_mask = marker[None].astype(np.float32)
        if cfg.noise_std > 0:
            image += np.float32(cfg.noise_std) * rng.standard_normal(self.shape, dtype=np.float32)
        return PhantomSample(
            image=image[None],
            mask=mask[None].astype(np.float32),
            body_mask=body[None],
            concepts=concepts,
            label=label,
            lesion_type=int(lesion_type_from_concepts(concepts)),
            shortcut_present=shortcut_present,
            confounder_mask=confounder_mask,
            lesion_concepts=lesion_concepts,
            lesion_centers_mm=lesion_centers,
            id=f"phantom{dims}d-{split}-{index:06d}",
        )

    def twin(self, split: str, index: int, change: str) -> PhantomTwin:
        """Sample ``index`` of ``split`` and its counterfactual twin under ``change`` (one thing removed or changed).

        See :mod:`pellucid.training.data.phantom_twins` for the changes (``"no_lesion"``, ``"no_spiculation"`` ...).
        """
        from pellucid.training.data.phantom_twins import twin  # the twins replay this generator's drawing steps

        return twin(self, split, index, change)

    def _draw_body(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Textured ellipsoidal body: (image, body mask, center in mm, semi-axes in mm)."""
        dims, fov = self.config.spatial_dims, self.field_of_view_mm
        draws = rng.random(4 * dims + 1)
        jitter, semi, crop_offset, flip = (draws[k * dims : (k + 1) * dims] for k in range(4))
        center = fov * (0.5 + scaled(jitter, (-_BODY_CENTER_JITTER, _BODY_CENTER_JITTER)))
        semi_axes = fov * scaled(semi, _BODY_SEMI_AXIS_RANGE)
        normalised = [
            (x - float(c)) * float(1 / a) for x, c, a in zip(self._grid_coords_mm, center, semi_axes, strict=True)
        ]
        body = sum(n * n for n in normalised) <= 1.0
        texture = self._textures[int(draws[-1] * len(self._textures))]
        crop = tuple(  # a random crop of the twice-as-large texture, flipped at random per axis
            slice(o + n - 1, o - 1 if o > 0 else None, -1) if f < 0.5 else slice(o, o + n)
            for o, n, f in zip((crop_offset * self._crop_choices).astype(int).tolist(), self.shape, flip, strict=True)
        )
        image = texture[crop] * np.float32(_TEXTURE_AMPLITUDE) + np.float32(_TISSUE_BASE)
        image *= body
        return image, body, center, semi_axes

    def _draw_lesions(
        self, rng: np.random.Generator, body_center: np.ndarray, body_semi_axes: np.ndarray
    ) -> list[_Lesion]:
        """Draw the attributes, shape and position of 0..max_lesions non-overlapping lesions."""
        cfg, dims = self.config, self.config.spatial_dims
        normal, lesion_count = rng.random(2).tolist()
        if normal < cfg.p_normal:
            return []
        lesions: list[_Lesion] = []
        for _ in range(1 + int(lesion_count * cfg.max_lesions)):
            draws = rng.random(8).tolist()
            diameter, contrast = scaled(draws[0], cfg.diameter_range_mm), scaled(draws[1], cfg.contrast_range)
            irregular, spiculated, calcified = (u < _P_ATTRIBUTE for u in draws[2:5])
            radius = diameter / 2
            lobe_count = count_in(draws[5], _LOBE_COUNT_RANGE) if irregular else 0
            lobe_offsets = spread_unit_vectors(rng, lobe_count, dims) * scaled(
                rng.random((lobe_count, 1)), _LOBE_OFFSET_RANGE
            )
            lobe_radii = scaled(rng.random(lobe_count), _LOBE_RADIUS_RANGE)
            spike_count = count_in(draws[6], _SPIKE_COUNT_RANGE) if spiculated else 0
            spike_reach = scaled(rng.random(spike_count), _SPIKE_REACH_RANGE)
            lobe_reach = np.sqrt((lobe_offsets * lobe_offsets).sum(axis=1)) + lobe_radii
            reach = max(1.0, float(spike_reach.max(initial=1.0)), float(lobe_reach.max(initial=1.0)))  # units of R
            extent = _lesion_extent_mm(radius, reach, self._max_spacing_mm)
            # Inside the body scaled by k = 1 - extent / smallest semi-axis, a ball of radius `extent` fits the body.
            scale = 1.0 - extent / float(body_semi_axes.min())
            for _attempt in range(20):
                direction = unit_vectors(rng, 1, dims)[0]
                center = body_center + direction * (rng.random() ** (1 / dims) * scale) * body_semi_axes
                if all(np.linalg.norm(center - other.center_mm) > extent + other.extent_mm for other in lesions):
                    break
            else:
                continue  # no room left for another lesion
            lesions.append(
                _Lesion(
                    center_mm=center,
                    radius_mm=radius,
                    extent_mm=extent,
                    concepts=[diameter, contrast, float(irregular), float(spiculated), float(calcified)],
                    lobe_offsets_mm=lobe_offsets * radius,
                    lobe_radii_mm=lobe_radii * radius,
                    spike_directions=unit_vectors(rng, spike_count, dims),
                    spike_reach_mm=spike_reach * radius,
                    calcification_count=count_in(draws[7], _CALCIFICATION_COUNT_RANGE) if calcified else 0,
                )
            )
        return lesions

    def _paint_lesion(self, rng: np.random.Generator, lesion: _Lesion, image: np.ndarray, mask: np.ndarray) -> None:
        """Add one lesion to ``image`` and ``mask`` in place, computing geometry only inside its bounding box."""
        dims, radius, center = self.config.spatial_dims, lesion.radius_mm, lesion.center_mm
        low = np.maximum(np.floor((center - lesion.extent_mm) / self.spacing_mm - 0.5).astype(int), 0)
        high = np.minimum(np.ceil((center + lesion.extent_mm) / self.spacing_mm - 0.5).astype(int) + 1, self.shape)
        box = tuple(slice(lo, hi) for lo, hi in zip(low.tolist(), high.tolist(), strict=True))
        offsets = [
            self._along_axis(self._axis_coords_mm[a][box[a]] - np.float32(center[a]), a) for a in range(dims)
        ]  # mm from the lesion center, per axis, broadcastable over the box
        squared_distance = sum(o * o for o in offsets)
        if len(lesion.lobe_radii_mm):  # lobulated: the union of a smaller core ball and the lobe balls
            core = squared_distance <= (_LOBED_CORE_FRACTION * radius) ** 2
            for lobe_center, lobe_radius in zip(
                lesion.lobe_offsets_mm.tolist(), lesion.lobe_radii_mm.tolist(), strict=True
            ):
                lobe_distance = sum((o - np.float32(c)) ** 2 for o, c in zip(offsets, lobe_center, strict=True))
                core |= lobe_distance <= lobe_radius**2
        else:
            core = squared_distance <= radius * radius
        core[tuple((center / self.spacing_mm).astype(int) - low)] = True  # a sub-voxel lesion still marks a voxel
        lesion_mask = core
        if len(lesion.spike_reach_mm):  # spicules: thin tapering rays from the center out to 1.5-1.8 R
            directions = lesion.spike_directions.astype(np.float32).reshape((-1, dims) + (1,) * dims)
            along = sum(o[None] * directions[:, a] for a, o in enumerate(offsets))  # (K, *box)
            reach = lesion.spike_reach_mm.astype(np.float32).reshape((-1,) + (1,) * dims)
            halfwidth = np.float32(_spike_halfwidth_mm(radius, self._max_spacing_mm)) * (1 - 0.5 * along / reach)
            spikes = (along > 0) & (along <= reach) & (squared_distance - along * along <= halfwidth * halfwidth)
            lesion_mask = core | spikes.any(axis=0)
        contribution = lesion_mask * np.float32(lesion.concepts[CONTRAST])
        if lesion.calcification_count:  # bright dots (a voxel and its face neighbours) in the inner core
            candidates = np.flatnonzero(core & (squared_distance <= (0.5 * radius) ** 2))
            candidates = candidates if candidates.size else np.flatnonzero(core)
            chosen = candidates[np.argsort(rng.random(candidates.size))[: lesion.calcification_count]]
            dots = np.zeros(core.shape, dtype=np.float32)
            for flat_index in chosen.tolist():
                voxels = np.asarray(np.unravel_index(flat_index, core.shape)) + self._dot_stencil
                voxels = tuple(voxels[((voxels >= 0) & (voxels < core.shape)).all(axis=1)].T)
                dots[voxels] = np.maximum(dots[voxels], np.float32(rng.uniform(*_CALCIFICATION_INTENSITY_RANGE)))
            contribution += dots * core
        image[box] += contribution
        mask[box] |= lesion_mask
