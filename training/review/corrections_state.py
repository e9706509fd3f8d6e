"""The corrections file of one review: read and checked when the review starts, rewritten at once on every mark.

A mark names a patch (:mod:`pellucid.models.prototype_corrections`): a prototype's own source patch
(``where: source``, :meth:`ReviewCorrections.mark_source`) or a patch of a training image where a prototype
activates (``where: activation``, :meth:`ReviewCorrections.mark_activation`; the page's "forbid here" on a prototype
shown for a training sample). Each mark rewrites the file in one step
(:func:`~pellucid.models.prototype_corrections.write_corrections`), so nothing is lost when the page or the server
is closed, and ``pellucid fit --init_from <model> --corrections <file>`` reads it as it is.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pellucid.models.prototype_corrections import (
    MARKS,
    WHERE,
    Correction,
    Corrections,
    CorrectionsError,
    read_corrections,
    write_corrections,
)
from pellucid.training.review.checks import ReviewError


def peak_cells(maps: torch.Tensor) -> list[list[int]]:
    """(P, *s) prototype maps of one image -> per prototype the latent cell of its largest value (the first on ties).

    The cell is in row-major coordinates, as push records a source's ``feature_index``.
    """
    flat = maps.detach().flatten(1).argmax(dim=1).cpu()
    cells = []
    for axis_size in reversed(maps.shape[1:]):
        cells.append(flat % axis_size)
        flat = flat // axis_size
    return torch.stack(cells[::-1], dim=1).tolist()


def image_box(cell: Sequence[int], feature_size: Sequence[int], image_size: Sequence[int]) -> list[list[int]]:
    """``[start, stop)`` per image axis of a latent cell's footprint (as push records a source's ``image_box``)."""
    box = []
    for c, f, s in zip(cell, feature_size, image_size, strict=True):
        scale = s / f
        box.append([int(math.floor(c * scale)), min(int(s), int(math.ceil((c + 1) * scale)))])
    return box


class ReviewCorrections:
    """The corrections of one review, written to ``path`` on every mark (thread-safe).

    Args:
        path: The corrections file; an existing one is read and continued.
        model_name: Registry name of the reviewed model.
        checkpoint: What was loaded, recorded in the file.
        provenance: The model's prototype sources (``None`` for a model without prototypes: nothing can be marked).
        spatial_dims: The model's spatial dims (every marked cell has this many indices).

    Raises:
        ReviewError: for an existing file that cannot be read, was written for another model, or names source
            patches that are not this checkpoint's (other weights).
    """

    def __init__(self, path: str | Path, model_name: str, checkpoint: str,
                 provenance: Sequence[Mapping[str, Any] | None] | None, spatial_dims: int) -> None:
        self.path, self.model_name, self.provenance = Path(path), model_name, provenance
        self._lock = threading.Lock()
        self.corrections = self._open(checkpoint, spatial_dims)

    def _open(self, checkpoint: str, spatial_dims: int) -> Corrections:
        if not self.path.exists() or self.provenance is None:
            return Corrections(self.model_name, checkpoint)
        try:
            corrections = read_corrections(self.path, len(self.provenance), spatial_dims)
        except CorrectionsError as error:
            raise ReviewError(str(error)) from None
        if corrections.model != self.model_name:
            raise ReviewError(f"--corrections {self.path}: written for model {corrections.model!r}, this is "
                              f"{self.model_name!r}; give another file to start a new review")
        for correction in corrections.corrections:
            if correction.where != "source":
                continue  # a training patch where the prototype activates: any patch may be marked
            source = self.provenance[correction.prototype] or {}
            if any(source.get(k) != correction.source.get(k) for k in ("sample_id", "feature_index")):
                raise ReviewError(
                    f"--corrections {self.path}: prototype {correction.prototype}'s source there "
                    f"({correction.source.get('sample_id')}, cell {correction.source.get('feature_index')}) is not "
                    f"this checkpoint's ({source.get('sample_id')}, cell {source.get('feature_index')}); the file "
                    "was written for other weights: give another file to start a new review")
        return corrections

    # ------------------------------------------------------------------------------------------------ reading
    def state(self) -> dict[str, Any]:
        """The file's path, whether prototypes can be marked, whether it exists, its content and the marks counted.

        ``counts`` is ``{where: {mark: number}}`` for ``where`` in source, activation.
        """
        counts = {where: dict.fromkeys(MARKS, 0) for where in WHERE}
        for correction in self.corrections.corrections:
            counts[correction.where][correction.mark] += 1
        return {"path": str(self.path), "enabled": self.provenance is not None, "written": self.path.exists(),
                "content": self.corrections.to_dict(), "counts": counts}

    def source_mark(self, prototype: int) -> Correction | None:
        """The mark of ``prototype``'s source patch, if any."""
        return next((c for c in self.corrections.corrections if c.prototype == prototype and c.where == "source"),
                    None)

    def activation_marks(self, prototype: int) -> list[Correction]:
        """The marked patches where ``prototype`` activates."""
        return [c for c in self.corrections.corrections if c.prototype == prototype and c.where == "activation"]

    def activation_mark(self, prototype: int, sample_id: str, cell: Sequence[int]) -> Correction | None:
        """The mark of the patch at ``cell`` of sample ``sample_id`` where ``prototype`` activates, if any."""
        patch = (str(sample_id), tuple(cell))
        return next((c for c in self.activation_marks(prototype) if c.patch() == patch), None)

    # ------------------------------------------------------------------------------------------------ marking
    def mark_source(self, prototype: int, mark: str | None, source: Mapping[str, Any] | None,
                    class_name: str | None, note: str) -> None:
        """Mark ``prototype``'s source patch (``None`` clears it) and write the file.

        Raises:
            ReviewError: for a prototype without source (not pushed).
        """
        with self._lock:
            try:
                self.corrections.set_mark(prototype, mark, source, class_name, note)
            except CorrectionsError as error:
                raise ReviewError(str(error)) from None
            write_corrections(self.corrections, self.path)

    def mark_activation(self, prototype: int, mark: str | None, patch: Mapping[str, Any], class_name: str | None,
                        note: str) -> None:
        """Mark the training ``patch`` where ``prototype`` activates (``None`` clears it) and write the file."""
        with self._lock:
            try:
                self.corrections.mark_activation(prototype, mark, patch, class_name, note)
            except CorrectionsError as error:
                raise ReviewError(str(error)) from None
            write_corrections(self.corrections, self.path)


__all__ = ["ReviewCorrections", "image_box", "peak_cells"]
