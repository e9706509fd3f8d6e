"""Concept specifications: the named, unit-carrying findings a concept model predicts.

A concept specification travels with the data (which concepts a dataset annotates) and with models
(which concepts a bottleneck predicts) and is saved in checkpoints, so a prediction can always be
read back in physical units.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

ConceptKind = Literal["binary", "continuous"]


@dataclass(frozen=True)
class ConceptSpec:
    """One clinical finding a model can predict and a user can correct.

    Args:
        name: Short identifier, e.g. ``"diameter_mm"`` or ``"spiculated"``.
        kind: ``"binary"`` (present/absent, predicted as a logit) or ``"continuous"`` (a value in ``unit``).
        unit: Physical unit of a continuous concept (``"mm"``); ``None`` for binary concepts.
        group: Optional group name; interventions can correct a whole group at once.
        description: One sentence a clinician can read.
    """

    name: str
    kind: ConceptKind
    unit: str | None = None
    group: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("binary", "continuous"):
            raise ValueError(f"concept {self.name!r}: kind must be 'binary' or 'continuous', got {self.kind!r}")
        if not self.name:
            raise ValueError("concept name must be a non-empty string")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (for checkpoints and metadata files)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConceptSpec:
        """Rebuild a specification saved by :meth:`to_dict`."""
        return cls(**data)


def as_concept_spec(value: ConceptSpec | dict[str, Any]) -> ConceptSpec:
    """Accept a :class:`ConceptSpec` or its dict form (from YAML or a checkpoint)."""
    if isinstance(value, ConceptSpec):
        return value
    if isinstance(value, dict):
        return ConceptSpec.from_dict(value)
    raise TypeError(f"expected a ConceptSpec or a dict with name/kind/unit/group, got {type(value).__name__}")
