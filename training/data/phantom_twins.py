"""Counterfactual twins of phantom samples: the same scan rendered with one thing removed or changed.

A twin is sample ``index`` of ``split`` rendered again with one change to its scene, everything else bit for bit
the same: the body, its tissue texture, every other lesion, the noise field, the marker (unless removed). The
generator draws a sample from one random stream in a fixed order (body, lesions, each lesion's calcification dots,
the marker draw, the noise); a twin replays that stream, keeps the noise and the marker draw of the original, and
repaints each lesion from the random state it was painted with, so only the changed lesion (or the marker) differs.

Changes (:data:`TWIN_CHANGES`), applied to the **index lesion** (the one that decides the label):

- ``no_lesion``: the index lesion removed (with several lesions the next one becomes the index lesion);
- ``no_spiculation``, ``no_calcification``, ``no_irregularity``: that finding removed (irregular becomes round: the
  core ball of radius R instead of the lobulated outline); calcification dots stay where they were otherwise;
- ``cross_diameter``: the core diameter mirrored across the 10 mm threshold of :data:`LABEL_RULE`, at least 3 mm
  from it (lobes and spicules scale with it), and only as large as still fits inside the body;
- ``no_marker``: the shortcut marker removed;
- ``normal``: every lesion and the marker removed (the scan as plain tissue).

A change that does not apply (no lesion, the finding absent, no marker, no room for the larger lesion) gives a twin
equal to the original with ``applicable`` False. The twin's concepts, label (:data:`LABEL_RULE` of its concepts) and
lesion type are recomputed the way the generator computes them. FunnyBirds (Hesse et al., ICCV 2023) renders such
part-removed twins of birds; the counterfactual metrics (:mod:`pellucid.training.elements.counterfactual`, defined in
``docs/counterfactual_metrics.md``) compare an explanation with what the model does on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pellucid.training.data.phantom import (
    _MARKER_INTENSITY,
    CALCIFIED,
    DIAMETER,
    IRREGULAR,
    LABEL_RULE,
    SPICULATED,
    SPLITS,
    PhantomGenerator,
    PhantomSample,
    _Lesion,
    _lesion_extent_mm,
    _spike_halfwidth_mm,
    lesion_type_from_concepts,
)

TWIN_CHANGES: tuple[str, ...] = ("no_lesion", "no_spiculation", "no_calcification", "no_irregularity",
                                 "cross_diameter", "no_marker", "normal")
# the concept each change sets (binary findings to 0, the diameter across the threshold)
CHANGED_CONCEPT: dict[str, int] = {"no_spiculation": SPICULATED, "no_calcification": CALCIFIED,
                                   "no_irregularity": IRREGULAR, "cross_diameter": DIAMETER}
DIAMETER_GAP_MM = 3.0  # a crossed diameter lies at least this far from the threshold (where the range allows)
_GROW_STEP_MM = 0.5  # a grown lesion that leaves the body is shrunk towards the threshold in these steps


@dataclass
class PhantomTwin:
    """A sample and its twin under one change.

    Attributes:
        change: One of :data:`TWIN_CHANGES`.
        original: The sample as :meth:`PhantomGenerator.sample` gives it.
        twin: The same scan with the change (equal to ``original`` when not ``applicable``); its id ends in
            ``+<change>``.
        applicable: Whether the change applies to this sample.
        region: (1, *S) bool, the voxels where ``twin.image`` differs from ``original.image``.
    """

    change: str
    original: PhantomSample
    twin: PhantomSample
    applicable: bool
    region: np.ndarray


@dataclass
class _Scene:
    """What a sample's random stream decided, kept so that it can be rendered again with a change."""

    split: str
    index: int
    tissue: np.ndarray  # (*S) float32, the textured body before any lesion
    body: np.ndarray  # (*S) bool
    lesions: list[_Lesion]  # in drawing order
    paint_states: list[dict[str, Any]]  # the random state each lesion was painted from
    marker_draw: float
    noise: np.ndarray | None  # (*S) float32, already scaled by noise_std


def _check_change(change: str) -> None:
    if change not in TWIN_CHANGES:
        raise ValueError(f"twin change must be one of {TWIN_CHANGES}, got {change!r}")


def _replay(generator: PhantomGenerator, split: str, index: int) -> _Scene:
    """Draw sample ``index`` of ``split`` exactly as :meth:`PhantomGenerator.sample` does, keeping every decision."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    rng = np.random.default_rng(np.random.SeedSequence([generator.seed, SPLITS.index(split), int(index)]))
    tissue, body, body_center, body_semi_axes = generator._draw_body(rng)
    lesions = generator._draw_lesions(rng, body_center, body_semi_axes)
    states, scratch, scratch_mask = [], tissue.copy(), np.zeros(generator.shape, dtype=bool)
    for lesion in lesions:  # painting consumes the stream (calcification dots): paint to advance it
        states.append(rng.bit_generator.state)
        generator._paint_lesion(rng, lesion, scratch, scratch_mask)
    marker_draw = float(rng.random())
    noise_std = generator.config.noise_std
    noise = np.float32(noise_std) * rng.standard_normal(generator.shape, dtype=np.float32) if noise_std > 0 else None
    return _Scene(split, int(index), tissue, body, lesions, states, marker_draw, noise)


def _paint(generator: PhantomGenerator, scene: _Scene, lesions: Sequence[_Lesion | None],
           marker: bool) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) of ``scene`` with ``lesions`` (aligned with ``scene.lesions``; ``None`` = left out)."""
    image, mask = scene.tissue.copy(), np.zeros(generator.shape, dtype=bool)
    for lesion, state in zip(lesions, scene.paint_states, strict=True):
        if lesion is not None:
            rng = np.random.default_rng()
            rng.bit_generator.state = state
            generator._paint_lesion(rng, lesion, image, mask)
    if marker:
        image[generator._marker] = _MARKER_INTENSITY
    if scene.noise is not None:
        image += scene.noise
    return image, mask


def _index_order(concepts: np.ndarray) -> np.ndarray:
    """Lesion order of the generator: most label points first, then the largest."""
    return np.lexsort((-concepts[:, DIAMETER], -LABEL_RULE.points(concepts)))


def _assemble(generator: PhantomGenerator, scene: _Scene, lesions: Sequence[_Lesion | None], shortcut_present: bool,
              suffix: str = "") -> PhantomSample:
    """The sample the generator would return for ``scene`` with ``lesions`` and the marker as given."""
    dims = generator.config.spatial_dims
    image, mask = _paint(generator, scene, lesions, shortcut_present)
    kept = [lesion for lesion in lesions if lesion is not None]
    lesion_concepts = np.asarray([lesion.concepts for lesion in kept], dtype=np.float32).reshape(-1, 5)
    lesion_centers = np.asarray([lesion.center_mm for lesion in kept], dtype=np.float32).reshape(-1, dims)
    if len(kept) > 1:
        order = _index_order(lesion_concepts)
        lesion_concepts, lesion_centers = lesion_concepts[order], lesion_centers[order]
    concepts = lesion_concepts[0].copy() if kept else np.zeros(5, dtype=np.float32)
    confounder_mask = None
    if generator.config.shortcut is not None:
        confounder_mask = (generator._marker if shortcut_present else np.zeros(generator.shape, dtype=bool))
        confounder_mask = confounder_mask[None].astype(np.float32)
    return PhantomSample(
        image=image[None], mask=mask[None].astype(np.float32), body_mask=scene.body[None], concepts=concepts,
        label=int(LABEL_RULE.label_from_concepts(concepts)), lesion_type=int(lesion_type_from_concepts(concepts)),
        shortcut_present=shortcut_present, confounder_mask=confounder_mask, lesion_concepts=lesion_concepts,
        lesion_centers_mm=lesion_centers, id=f"phantom{dims}d-{scene.split}-{scene.index:06d}{suffix}")


def _original_marker(generator: PhantomGenerator, scene: _Scene) -> bool:
    shortcut = generator.config.shortcut
    if shortcut is None:
        return False
    concepts = np.asarray([lesion.concepts for lesion in scene.lesions], dtype=np.float32).reshape(-1, 5)
    label = int(LABEL_RULE.label_from_concepts(concepts[_index_order(concepts)[0]])) if len(concepts) else 0
    strength = shortcut.get(scene.split, 0.5)
    return bool(scene.marker_draw < (strength if label == 2 else 1.0 - strength))


def _with_concept(lesion: _Lesion, column: int, value: float, **fields: Any) -> _Lesion:
    concepts = list(lesion.concepts)
    concepts[column] = value
    return replace(lesion, concepts=concepts, **fields)


def crossed_diameter_mm(diameter_mm: float, diameter_range_mm: tuple[float, float]) -> float:
    """The diameter mirrored across :data:`LABEL_RULE`'s size threshold, at least :data:`DIAMETER_GAP_MM` from it.

    It stays inside ``diameter_range_mm`` where the range reaches far enough past the threshold (a lesion smaller
    than the threshold grows to ``2 T - d``, at least ``T + 3`` mm; a larger one shrinks to ``2 T - d``, at most
    ``T - 3`` mm).
    """
    threshold, (low, high) = LABEL_RULE.large_diameter_mm, diameter_range_mm
    if diameter_mm >= threshold:
        return max(min(2 * threshold - diameter_mm, threshold - DIAMETER_GAP_MM), min(low, threshold - DIAMETER_GAP_MM))
    return min(max(2 * threshold - diameter_mm, threshold + DIAMETER_GAP_MM), max(high, threshold + DIAMETER_GAP_MM))


def _resized(generator: PhantomGenerator, lesion: _Lesion, diameter_mm: float) -> _Lesion:
    """``lesion`` with core diameter ``diameter_mm`` (lobes and spicules scaled with it; its box big enough)."""
    scale = diameter_mm / 2 / lesion.radius_mm
    old_halfwidth = _spike_halfwidth_mm(lesion.radius_mm, generator._max_spacing_mm)
    reach = (lesion.extent_mm - old_halfwidth) / lesion.radius_mm  # in units of R
    extent = max(lesion.extent_mm, _lesion_extent_mm(diameter_mm / 2, reach, generator._max_spacing_mm))
    return _with_concept(lesion, DIAMETER, float(diameter_mm), radius_mm=diameter_mm / 2, extent_mm=extent,
                         lobe_offsets_mm=lesion.lobe_offsets_mm * scale, lobe_radii_mm=lesion.lobe_radii_mm * scale,
                         spike_reach_mm=lesion.spike_reach_mm * scale)


def _fits_body(generator: PhantomGenerator, scene: _Scene, position: int, lesion: _Lesion) -> bool:
    image, mask = np.zeros(generator.shape, dtype=np.float32), np.zeros(generator.shape, dtype=bool)
    rng = np.random.default_rng()
    rng.bit_generator.state = scene.paint_states[position]
    generator._paint_lesion(rng, lesion, image, mask)
    return not bool((mask & ~scene.body).any())


def _cross_diameter(generator: PhantomGenerator, scene: _Scene, position: int) -> _Lesion | None:
    """The index lesion moved across the size threshold, or ``None`` when no such size fits inside the body."""
    lesion = scene.lesions[position]
    diameter = float(lesion.concepts[DIAMETER])
    target = crossed_diameter_mm(diameter, generator.config.diameter_range_mm)
    if target < diameter:
        return _resized(generator, lesion, target)
    threshold = LABEL_RULE.large_diameter_mm
    for size in [*np.arange(target, threshold, -_GROW_STEP_MM).tolist(), threshold]:
        grown = _resized(generator, lesion, size)
        if _fits_body(generator, scene, position, grown):
            return grown
    return None


def _changed_scene(generator: PhantomGenerator, scene: _Scene, change: str,
                   marker: bool) -> tuple[list[_Lesion | None], bool] | None:
    """(lesions, marker) of the twin, or ``None`` when ``change`` does not apply to the scene."""
    lesions: list[_Lesion | None] = list(scene.lesions)
    if change == "no_marker":
        return (lesions, False) if marker else None
    if change == "normal":
        return ([None] * len(lesions), False) if lesions or marker else None
    if not lesions:
        return None
    concepts = np.asarray([lesion.concepts for lesion in scene.lesions], dtype=np.float32)
    position = int(_index_order(concepts)[0])
    index_lesion = scene.lesions[position]
    column = CHANGED_CONCEPT.get(change)
    if column is not None and column != DIAMETER and index_lesion.concepts[column] < 0.5:
        return None  # the finding is absent
    dims = generator.config.spatial_dims
    if change == "no_lesion":
        changed: _Lesion | None = None
    elif change == "no_spiculation":
        changed = _with_concept(index_lesion, SPICULATED, 0.0, spike_directions=np.zeros((0, dims)),
                                spike_reach_mm=np.zeros(0))
    elif change == "no_calcification":
        changed = _with_concept(index_lesion, CALCIFIED, 0.0, calcification_count=0)
    elif change == "no_irregularity":
        changed = _with_concept(index_lesion, IRREGULAR, 0.0, lobe_offsets_mm=np.zeros((0, dims)),
                                lobe_radii_mm=np.zeros(0))
    else:  # cross_diameter
        changed = _cross_diameter(generator, scene, position)
        if changed is None:
            return None
    lesions[position] = changed
    return lesions, marker


def render_twins(generator: PhantomGenerator, split: str, index: int,
                 changes: Sequence[str] = TWIN_CHANGES) -> dict[str, PhantomTwin]:
    """Sample ``index`` of ``split`` and its twin under each of ``changes`` (one replay of the sample for all).

    Raises:
        ValueError: for an unknown change, split or index.
    """
    for change in changes:
        _check_change(change)
    scene = _replay(generator, split, index)
    marker = _original_marker(generator, scene)
    original = _assemble(generator, scene, scene.lesions, marker)
    twins = {}
    for change in changes:
        edited = _changed_scene(generator, scene, change, marker)
        twin = original if edited is None else _assemble(generator, scene, *edited, suffix=f"+{change}")
        twins[change] = PhantomTwin(change, original, twin, edited is not None, twin.image != original.image)
    return twins


def twin(generator: PhantomGenerator, split: str, index: int, change: str) -> PhantomTwin:
    """Sample ``index`` of ``split`` and its twin under ``change`` (one of :data:`TWIN_CHANGES`)."""
    return render_twins(generator, split, index, (change,))[change]


# ------------------------------------------------------------------------------------------- batches of twins
def parse_sample_id(sample_id: str, spatial_dims: int) -> tuple[str, int]:
    """(split, index) of a phantom sample id such as ``phantom2d-test-000042``.

    Raises:
        ValueError: naming the id when it is not a phantom id of this dimension.
    """
    prefix, _, rest = str(sample_id).partition("-")
    split, _, number = rest.partition("-")
    if prefix != f"phantom{spatial_dims}d" or split not in SPLITS or not number.isdigit():
        raise ValueError(f"counterfactual twins: {sample_id!r} is not a phantom{spatial_dims}d sample id "
                         f"(expected 'phantom{spatial_dims}d-<split>-<index>', split one of {SPLITS}); twins exist "
                         "only for samples of the phantom generator that made the batch")
    return split, int(number)


@dataclass
class TwinBatch:
    """A batch of twins under one change, aligned with the batch it was made for (torch tensors).

    Attributes:
        original: (B, 1, *S) the samples' images (to check that the twins belong to the batch).
        image: (B, 1, *S) the twins' images (the original image where the change does not apply).
        applicable: (B,) bool, whether the change applies.
        label: (B,) long, the twins' labels (:data:`LABEL_RULE`).
        concepts: (B, 5) the twins' concepts.
        region: (B, 1, *S) bool, the voxels that differ from the original.
    """

    original: Tensor
    image: Tensor
    applicable: Tensor
    label: Tensor
    concepts: Tensor
    region: Tensor

    def to(self, device: torch.device | str) -> TwinBatch:
        """The same batch on ``device``."""
        return TwinBatch(*(getattr(self, name).to(device) for name in
                           ("original", "image", "applicable", "label", "concepts", "region")))


def twin_batches(generator: PhantomGenerator, sample_ids: Sequence[str],
                 changes: Sequence[str] = TWIN_CHANGES) -> dict[str, TwinBatch]:
    """For the phantom samples ``sample_ids`` (a batch's ``id``), one :class:`TwinBatch` per change (on the CPU).

    Raises:
        ValueError: for an id that is not one of this generator's samples, or an unknown change.
    """
    if not sample_ids:
        raise ValueError("counterfactual twins: got no sample ids (an empty batch)")
    rows: dict[str, list[PhantomTwin]] = {change: [] for change in changes}
    for sample_id in sample_ids:
        split, index = parse_sample_id(sample_id, generator.config.spatial_dims)
        for change, found in render_twins(generator, split, index, changes).items():
            rows[change].append(found)
    batches = {}
    for change, found in rows.items():
        def stack(read: Any, rows: list[PhantomTwin] = found) -> Tensor:
            return torch.from_numpy(np.stack([read(row) for row in rows]))

        batches[change] = TwinBatch(
            original=stack(lambda row: row.original.image), image=stack(lambda row: row.twin.image),
            applicable=torch.tensor([row.applicable for row in found], dtype=torch.bool),
            label=torch.tensor([row.twin.label for row in found], dtype=torch.long),
            concepts=stack(lambda row: row.twin.concepts), region=stack(lambda row: row.region))
    return batches
