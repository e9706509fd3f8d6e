"""The phantom benchmark's ground-truth vocabulary: classes, concepts with units, lesion types and the label rule.

:data:`LABEL_RULE` is the single source of truth for how the label follows from the concepts; the generator uses
it, and a model's transparent head can be compared with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from pellucid.models.concepts import ConceptSpec

SPLITS: tuple[str, ...] = ("train", "val", "test", "predict")
PHANTOM_CLASSES: list[str] = ["normal", "benign", "malignant"]
PHANTOM_CONCEPTS: list[ConceptSpec] = [
    ConceptSpec("diameter_mm", "continuous", "mm", "size", "Core diameter 2R of the index lesion; 0 without lesion."),
    ConceptSpec("contrast", "continuous", "a.u.", "intensity", "Intensity the lesion adds to the tissue."),
    ConceptSpec("irregular", "binary", None, "shape", "Lobulated outline instead of a round one."),
    ConceptSpec("spiculated", "binary", None, "margin", "Thin radial spikes leave the lesion core."),
    ConceptSpec("calcified", "binary", None, "calcification", "Small very bright dots inside the lesion core."),
]
DIAMETER, CONTRAST, IRREGULAR, SPICULATED, CALCIFIED = range(5)
# Lesion type id = 0 without lesion, else 1 + irregular + 2 * spiculated + 4 * calcified; "round" = not irregular.
LESION_TYPE_NAMES: list[str] = ["none"] + [
    " ".join(["irregular" if t & 1 else "round"] + ["spiculated"] * (t >> 1 & 1) + ["calcified"] * (t >> 2))
    for t in range(8)
]


ArrayT = TypeVar("ArrayT")  # numpy.ndarray or torch.Tensor


def _flags(values: Any, threshold: float = 0.5) -> Any:
    """``values >= threshold`` as float 0/1, for numpy arrays and torch tensors alike."""
    present = values >= threshold
    if isinstance(present, np.ndarray | np.generic):
        return present.astype(np.float32)
    return present.float()


def _as_int64(values: Any) -> Any:
    return values.astype(np.int64) if isinstance(values, np.ndarray | np.generic) else values.long()


@dataclass(frozen=True)
class PointsLabelRule:
    """The documented rule from the five phantom concepts to the label (0 normal, 1 benign, 2 malignant).

    ``points = 2*spiculated + 1*irregular + 1*[diameter_mm >= 10] - 1*calcified``; no lesion (``diameter_mm <= 0``)
    is normal; a lesion with ``points >= 2`` is malignant, otherwise benign. Binary concepts count as present when
    ``>= 0.5``, so ground-truth 0/1 values and predicted probabilities both work.

    Args:
        spiculated_points: Points for a spiculated margin.
        irregular_points: Points for an irregular (lobulated) outline.
        large_points: Points for a lesion with ``diameter_mm >= large_diameter_mm``.
        large_diameter_mm: Diameter from which a lesion counts as large, in mm.
        calcified_points: Points for calcifications (negative: benign-looking).
        malignant_threshold: Lesions with at least this many points are malignant.
    """

    spiculated_points: float = 2.0
    irregular_points: float = 1.0
    large_points: float = 1.0
    large_diameter_mm: float = 10.0
    calcified_points: float = -1.0
    malignant_threshold: float = 2.0

    def points(self, concepts: ArrayT) -> ArrayT:
        """Suspicion points of ``concepts`` (..., 5) numpy array or torch tensor -> (...) float."""
        large = _flags(concepts[..., DIAMETER], self.large_diameter_mm)
        return (
            self.spiculated_points * _flags(concepts[..., SPICULATED])
            + self.irregular_points * _flags(concepts[..., IRREGULAR])
            + self.large_points * large
            + self.calcified_points * _flags(concepts[..., CALCIFIED])
        )

    def label_from_concepts(self, concepts: ArrayT) -> ArrayT:
        """Class index (..., ) int64 of ``concepts`` (..., 5): 0 normal, 1 benign, 2 malignant."""
        has_lesion = _as_int64(concepts[..., DIAMETER] > 0)
        malignant = _as_int64(self.points(concepts) >= self.malignant_threshold)
        return has_lesion * (1 + malignant)

    def describe(self) -> str:
        """The rule as one readable sentence."""
        calcified_sign = "-" if self.calcified_points < 0 else "+"
        return (
            f"points = {self.spiculated_points:g}*spiculated + {self.irregular_points:g}*irregular"
            f" + {self.large_points:g}*[diameter_mm >= {self.large_diameter_mm:g}]"
            f" {calcified_sign} {abs(self.calcified_points):g}*calcified; no lesion (diameter_mm = 0) -> normal;"
            f" points >= {self.malignant_threshold:g} -> malignant; otherwise benign"
        )


LABEL_RULE = PointsLabelRule()


def lesion_type_from_concepts(concepts: ArrayT) -> ArrayT:
    """Lesion type id (..., ) int64: 0 without lesion, else ``1 + irregular + 2*spiculated + 4*calcified``."""
    has_lesion = _as_int64(concepts[..., DIAMETER] > 0)
    code = (
        _flags(concepts[..., IRREGULAR]) + 2 * _flags(concepts[..., SPICULATED]) + 4 * _flags(concepts[..., CALCIFIED])
    )
    return has_lesion * (1 + _as_int64(code))
