"""A person's corrected findings, applied to a concept model at prediction time (``pellucid predict --interventions``).

The file is a CSV with one correction per row::

    id,concept,value,unit
    case-017,diameter_mm,12.5,mm
    case-017,spiculated,0,
    case-042,contrast,0.8,a.u.

- ``id``: a sample id of the prediction data (the manifest's id column, or the image file name without suffix).
- ``concept``: a concept the model predicts (its ``concept_specs``).
- ``value``: the corrected value in the concept's unit: 0 or 1 for a binary concept (or a probability in [0, 1]),
  e.g. millimetres for ``diameter_mm``. Values outside what the unit allows are refused (:func:`unit_range`).
- ``unit`` (optional column): when filled, it must equal the concept's unit, so a value written in cm for a concept
  in mm is refused instead of silently read as mm.

The whole file is checked before anything is written (:class:`ConceptInterventions` reads it when it is made, checks
it against the model before ``predict`` starts and against the prediction data's ids at ``on_predict_start``); the
first problem is one :class:`InterventionFileError` line naming the file, the row (spreadsheet numbering: the header
is row 1), the field, what was expected, what was found and the fix.

Applying: the model's ``forward`` takes interventions as explicit arguments (``concept_mask``, ``concept_values``).
:class:`ConceptInterventions` hands them to it for each batch through a forward pre-hook on the model, so the
module's ``predict_step`` runs unchanged, and records in the batch what it set (``interventions``) and the class
logits the model gives without them (``logits_without_interventions``); the
:class:`~pellucid.training.outputs.writer.ExplanationWriter` writes both into the sample's index row
(:func:`intervention_columns`) and its explanation (localization, concepts, probabilities) is the corrected model's.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pellucid.models import InterpretableModel
from pellucid.models.concepts import ConceptSpec
from pellucid.training.data.prediction_data import prediction_ids
from pellucid.training.metrics import probabilities

REQUIRED_COLUMNS = ("id", "concept", "value")
BATCH_RECORD, BATCH_LOGITS = "interventions", "logits_without_interventions"

_NON_NEGATIVE = (0.0, math.inf)
# units whose quantity cannot be negative (lengths, areas, volumes, counts) or is bounded by definition
UNIT_RANGES: dict[str, tuple[float, float]] = {
    **dict.fromkeys(("mm", "cm", "m", "um", "µm", "mm2", "mm^2", "mm²", "cm2", "cm^2", "cm²", "mm3", "mm^3", "mm³",
                     "cm3", "cm^3", "cm³", "ml", "mL", "cc", "count", "voxels", "pixels"), _NON_NEGATIVE),
    "%": (0.0, 100.0),
    "percent": (0.0, 100.0),
    "fraction": (0.0, 1.0),
    "probability": (0.0, 1.0),
    "HU": (-1024.0, 3071.0),  # the range of a 12-bit CT number
}


class InterventionFileError(ValueError):
    """An interventions file cannot be applied: unreadable, malformed, or naming what the model or data lack."""


def unit_range(spec: ConceptSpec) -> tuple[float, float]:
    """The values a concept's unit allows: [0, 1] for binary concepts, :data:`UNIT_RANGES` by unit, else any."""
    if spec.kind == "binary":
        return 0.0, 1.0
    return UNIT_RANGES.get((spec.unit or "").strip(), (-math.inf, math.inf))


def _unit_text(spec: ConceptSpec) -> str:
    return "0/1 or a probability" if spec.kind == "binary" else (spec.unit or "no unit")


@dataclass
class InterventionTable:
    """The corrections of one file: per sample id, concept name -> value in the concept's unit.

    Attributes:
        path: The file.
        corrections: Sample id -> {concept name: value}.
        rows: Sample id -> {concept name: spreadsheet row number}, to name a row in later errors.
        units: Sample id -> {concept name: (row number, unit)} for the rows whose optional unit cell is filled.
        sha256: The file's sha256 (the explanation folder records it).
    """

    path: Path
    corrections: dict[str, dict[str, float]] = field(default_factory=dict)
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    units: dict[str, dict[str, tuple[int, str]]] = field(default_factory=dict)
    sha256: str = ""

    def error(self, row: int | None, column: str | None, expected: str, actual: Any, fix: str) -> InterventionFileError:
        """One line naming the file, row, field, expected and actual value, and the fix."""
        where = f"interventions file {self.path}" + (f", row {row}" if row is not None else "") + (
            f", field {column!r}" if column is not None else "")
        return InterventionFileError(f"{where}: expected {expected}, got {actual}; fix: {fix}")

    def check_model(self, model: nn.Module) -> list[ConceptSpec]:
        """Check that ``model`` takes interventions and knows every concept and value of the file; return its specs.

        Raises:
            InterventionFileError: for a model without concepts or interventions, an unknown concept, a unit other
                than the concept's, or a value outside what the concept's unit allows.
        """
        specs = list(getattr(model, "concept_specs", None) or [])
        accepts = isinstance(model, InterpretableModel) and model.accepts_interventions()
        if not specs or not accepts:
            name = getattr(model, "name", type(model).__name__)
            raise self.error(None, None, "a concept model whose forward takes concept_mask and concept_values (cbm, "
                             "cem, ...)", f"model {name!r} (concepts: {[s.name for s in specs]}, accepts "
                             f"interventions: {accepts})", "predict with a concept model's checkpoint, or leave out "
                             "--interventions")
        by_name = {spec.name: spec for spec in specs}
        for sample_id, values in self.corrections.items():
            for concept, value in values.items():
                row = self.rows[sample_id][concept]
                spec = by_name.get(concept)
                if spec is None:
                    raise self.error(row, "concept", f"one of the model's concepts {sorted(by_name)}",
                                     repr(concept), "correct the concept's name")
                low, high = unit_range(spec)
                if not low <= value <= high:
                    raise self.error(row, "value", f"a value of {concept!r} in [{low:g}, {high:g}] "
                                     f"({_unit_text(spec)})", f"{value:g}",
                                     "write the value in the concept's unit, within that range")
        self._check_units(by_name)
        return specs

    def _check_units(self, by_name: Mapping[str, ConceptSpec]) -> None:
        for units in self.units.values():
            for concept, (row, unit) in units.items():
                spec = by_name[concept]
                allowed = {"", "probability", "0/1"} if spec.kind == "binary" else {(spec.unit or "").strip()}
                if unit not in allowed:
                    raise self.error(row, "unit", f"{_unit_text(spec)!r} (the unit of {concept!r}) or blank",
                                     repr(unit), f"convert the value to {_unit_text(spec)} and write that unit")

    def check_ids(self, known: Sequence[str]) -> None:
        """Refuse ids the prediction data do not hold (naming the first such row and a few known ids)."""
        present = set(known)
        for sample_id in self.corrections:
            if sample_id not in present:
                row = min(self.rows[sample_id].values())
                shown = ", ".join(repr(i) for i in list(known)[:3]) + (", ..." if len(known) > 3 else "")
                raise self.error(row, "id", f"a sample id of the prediction data ({len(present)} samples: "
                                 f"{shown or 'none'})", repr(sample_id),
                                 "use the ids predict writes in index.csv (the manifest's id column, or the image "
                                 "file name without suffix)")

    def tensors(self, ids: Sequence[str], specs: Sequence[ConceptSpec]) -> tuple[Tensor, Tensor]:
        """``(concept_mask, concept_values)`` of shape (B, M) for a batch's ids, in the model's concept order."""
        mask = torch.zeros(len(ids), len(specs), dtype=torch.bool)
        values = torch.zeros(len(ids), len(specs))
        for row, sample_id in enumerate(ids):
            for column, spec in enumerate(specs):
                value = self.corrections.get(sample_id, {}).get(spec.name)
                if value is not None:
                    mask[row, column], values[row, column] = True, value
        return mask, values


def read_interventions(path: str | Path) -> InterventionTable:
    """Read and check the file's format: columns, ids, concepts, numbers, one value per sample and concept.

    Checks that need the model (concepts, units, ranges) are :meth:`InterventionTable.check_model`; those that need
    the data (ids) :meth:`InterventionTable.check_ids`.

    Raises:
        InterventionFileError: naming the file, row, field, expected and actual value, and the fix.
    """
    path = Path(path)
    table = InterventionTable(path)
    try:
        content = path.read_bytes()
        text = content.decode("utf-8-sig")
    except OSError as error:
        raise table.error(None, None, "a readable CSV file", f"{type(error).__name__}: {error.strerror or error}",
                          "give the path of the interventions CSV") from None
    except UnicodeDecodeError:
        raise table.error(None, None, "UTF-8 text", "undecodable bytes", "save the file as CSV (UTF-8)") from None
    table.sha256 = hashlib.sha256(content).hexdigest()
    reader = csv.DictReader(text.splitlines())
    header = [name.strip() for name in reader.fieldnames or []]
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise table.error(1, None, f"a header with the columns {list(REQUIRED_COLUMNS)} (and optionally 'unit')",
                          f"columns {header}", f"add the column(s) {missing} to the first row")
    for number, record in enumerate(reader, start=2):
        record = {str(key).strip(): (value or "").strip() for key, value in record.items() if key is not None}
        _add_row(table, number, record)
    if not table.corrections:
        raise table.error(None, None, "at least one row (id, concept, value)", "no rows",
                          "add a row per corrected finding, or leave out --interventions")
    return table


def _add_row(table: InterventionTable, number: int, record: Mapping[str, str]) -> None:
    for column in REQUIRED_COLUMNS:
        if not record.get(column):
            raise table.error(number, column, "a value", "an empty cell", f"fill in {column!r} or delete the row")
    sample_id, concept = record["id"], record["concept"]
    try:
        value = float(record["value"])
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise table.error(number, "value", "a finite number in the concept's unit", repr(record["value"]),
                          "write the number alone (decimal point, no unit)")
    earlier = table.rows.get(sample_id, {}).get(concept)
    if earlier is not None:
        raise table.error(number, "concept", f"one correction per sample and concept ({sample_id!r}, {concept!r} "
                          f"is already set in row {earlier})", repr(concept), "keep one of the two rows")
    table.corrections.setdefault(sample_id, {})[concept] = value
    table.rows.setdefault(sample_id, {})[concept] = number
    if record.get("unit"):
        table.units.setdefault(sample_id, {})[concept] = (number, record["unit"])


class ConceptInterventions(pl.Callback):
    """Apply an interventions file to every ``predict`` batch (see the module docstring).

    Usable from a config (``trainer.callbacks``) or through ``pellucid predict --interventions <csv>``; list it before
    the writer so its checks run before the writer claims its folder (``--interventions`` puts it first).

    Args:
        path: The interventions CSV.
    """

    def __init__(self, path: str | Path) -> None:
        self.table = read_interventions(path)
        self.specs: list[ConceptSpec] = []
        self._handle: RemovableHandle | None = None
        self._pending: tuple[Tensor, Tensor] | None = None

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model that does not take interventions, or the file's concepts and values it does not know."""
        self.specs = self.table.check_model(model)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the file against the model and the prediction data's ids, then hand the model its interventions."""
        model = getattr(pl_module, "model", pl_module)
        self.check_model(model)
        self.table.check_ids(prediction_ids(trainer))
        self._handle = model.register_forward_pre_hook(self._intervene, with_kwargs=True)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        """Record the batch's corrections and its logits without them; arm the hook for the batch's forward."""
        ids = [str(i) for i in batch["id"]]
        batch[BATCH_RECORD] = [dict(self.table.corrections.get(i, {})) for i in ids]
        self._pending = None
        if any(batch[BATCH_RECORD]):
            model = getattr(pl_module, "model", pl_module)
            batch[BATCH_LOGITS] = model(batch["image"], explain=False).logits.detach()
            self._pending = self.table.tensors(ids, self.specs)

    def _intervene(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """The forward pre-hook: give the armed batch's ``concept_mask`` and ``concept_values`` (once)."""
        if self._pending is None:
            return args, kwargs
        mask, values = self._pending
        image = args[0] if args else kwargs["image"]
        if image.shape[0] != mask.shape[0]:
            raise RuntimeError(f"ConceptInterventions: the model was called on {image.shape[0]} images, the batch "
                               f"has {mask.shape[0]} ids")
        self._pending = None
        return args, {**kwargs, "concept_mask": mask.to(image.device),
                      "concept_values": values.to(image.device, image.dtype)}

    def _release(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._pending = None

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the hook: the model predicts as trained afterwards."""
        self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the hook after a failed run too."""
        self._release()


def interventions_sha256(trainer: pl.Trainer) -> str | None:
    """The sha256 of the interventions file a running ``predict`` applies (``None`` without one)."""
    for callback in trainer.callbacks:
        if isinstance(callback, ConceptInterventions):
            return callback.table.sha256
    return None


def intervention_columns(batch: Any, index: int, class_names: Sequence[str] | None,
                         task: str) -> dict[str, Any]:
    """Index-row fields of sample ``index``: the corrections applied and the prediction without them ({} if none)."""
    if not isinstance(batch, Mapping) or not batch.get(BATCH_RECORD) or not batch[BATCH_RECORD][index]:
        return {}
    row: dict[str, Any] = {"interventions": batch[BATCH_RECORD][index]}
    logits = batch.get(BATCH_LOGITS)
    if isinstance(logits, Tensor):
        plain = probabilities(logits[index:index + 1].detach().float().cpu(), task)[0]
        names = list(class_names or [str(k) for k in range(plain.numel())])
        if task == "multilabel":
            row["prediction_without_interventions"] = ";".join(n for n, p in zip(names, plain.tolist(), strict=False)
                                                               if p >= 0.5)
        else:
            row["prediction_without_interventions"] = names[int(plain.argmax())]
    return row
