"""Reading and checking a user's manifest: one row per image, every bad row named in one error.

A manifest is a CSV file (header row) or a JSON file (a list of objects, or ``{"rows": [...]}``). Columns:

- the image path (PNG, JPEG, NIfTI, a DICOM file or a DICOM series folder), relative to the manifest's folder
  unless absolute;
- the label (one column: a class name or index) or labels (several 0/1 columns: multi-label);
- optionally a mask path, concept columns (declared with their kind and unit), a patient id, a sample id and an
  explicit split (``train``/``val``/``test``/``predict``).
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pellucid.models.concepts import ConceptSpec

SPLIT_NAMES = ("train", "val", "test", "predict")


class ManifestError(ValueError):
    """The manifest has bad rows; ``problems`` lists ``(row number, id, reason)`` for every one of them."""

    def __init__(self, manifest: str | Path, problems: Sequence[tuple[int, str, str]]) -> None:
        self.manifest = str(manifest)
        self.problems = list(problems)
        lines = [f"row {row} (id {sample_id!r}): {reason}" for row, sample_id, reason in self.problems]
        rows = len({row for row, _, _ in self.problems})
        super().__init__(f"manifest {self.manifest}: {rows} bad row(s), {len(self.problems)} problem(s)\n  "
                         + "\n  ".join(lines))


@dataclass
class ManifestRow:
    """One parsed manifest row (numbers are 1-based data rows, as a spreadsheet shows them after the header)."""

    number: int
    sample_id: str
    image: Path
    label: int | list[float] | None
    mask: Path | None = None
    concepts: list[float] = field(default_factory=list)
    patient: str | None = None
    split: str | None = None


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV or JSON manifest as dicts.

    Raises:
        FileNotFoundError: if the manifest does not exist.
        ValueError: for an unknown extension or a malformed JSON layout.
    """
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist")
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        rows = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"manifest {path}: expected a JSON list of objects or {{'rows': [...]}}, "
                             f"got {type(data).__name__}")
        return rows
    raise ValueError(f"manifest {path}: expected a .csv or .json file, got suffix {path.suffix!r}")


def _stem(path: str) -> str:
    """File name without its suffixes (``scan.nii.gz`` -> ``scan``); a folder's name as it is."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".dcm", ".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "") or (
        isinstance(value, float) and math.isnan(value))


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def parse_rows(
    table: list[dict[str, Any]],
    root: Path,
    image_column: str,
    label_columns: list[str],
    class_names: list[str] | None,
    mask_column: str | None,
    concepts: list[ConceptSpec],
    patient_column: str | None,
    id_column: str | None,
    split_column: str | None,
) -> tuple[list[ManifestRow], list[tuple[int, str, str]]]:
    """Parse every row, collecting problems instead of stopping at the first.

    Checks here are the ones that need no image I/O: missing columns or files, unknown labels, non-numeric or
    out-of-range concepts, unknown splits. Image content is checked by the data module's ``validate``.
    """
    rows: list[ManifestRow] = []
    problems: list[tuple[int, str, str]] = []
    for number, record in enumerate(table, start=1):
        sample_id = str(record.get(id_column)) if id_column and not _blank(record.get(id_column)) \
            else _stem(str(record.get(image_column) or f"row{number}"))
        reasons: list[str] = []
        image_value = record.get(image_column)
        image = None
        if _blank(image_value):
            reasons.append(f"column {image_column!r} is empty or missing")
        else:
            image = Path(str(image_value)) if Path(str(image_value)).is_absolute() else root / str(image_value)
            if not image.exists():
                reasons.append(f"missing file: image {str(image)!r} does not exist")
        label = _parse_label(record, label_columns, class_names, reasons)
        mask = None
        if mask_column and not _blank(record.get(mask_column)):
            mask = Path(str(record[mask_column]))
            mask = mask if mask.is_absolute() else root / mask
            if not mask.exists():
                reasons.append(f"missing file: mask {str(mask)!r} does not exist")
        values = _parse_concepts(record, concepts, reasons)
        split = None
        if split_column and not _blank(record.get(split_column)):
            split = str(record[split_column]).strip()
            if split not in SPLIT_NAMES:
                reasons.append(f"unknown split {split!r} in column {split_column!r}; expected one of {SPLIT_NAMES}")
        patient = None if not patient_column or _blank(record.get(patient_column)) else str(record[patient_column])
        if patient_column and patient is None:
            reasons.append(f"column {patient_column!r} (patient id) is empty or missing")
        problems.extend((number, sample_id, reason) for reason in reasons)
        if not reasons:
            rows.append(ManifestRow(number, sample_id, image, label, mask, values, patient, split))
    return rows, problems


def _parse_label(record: dict[str, Any], columns: list[str], class_names: list[str] | None,
                 reasons: list[str]) -> int | list[float] | None:
    if not columns:
        return None
    if len(columns) > 1:  # multi-label: one 0/1 column per class
        values = []
        for column in columns:
            raw = record.get(column)
            try:
                value = _number(raw)
            except (TypeError, ValueError):
                reasons.append(f"unknown label: column {column!r} must be 0 or 1, got {raw!r}")
                continue
            if value not in (0.0, 1.0):
                reasons.append(f"unknown label: column {column!r} must be 0 or 1, got {raw!r}")
            values.append(value)
        return values
    raw = record.get(columns[0])
    if _blank(raw):
        return None  # unlabelled (allowed for prediction-only rows)
    text = str(raw).strip()
    names = class_names or []
    if text in names:
        return names.index(text)
    try:
        number = float(text)
        index = int(number)
    except (ValueError, OverflowError):  # not a number, or inf / -inf (nan fails the check below)
        reasons.append(f"unknown label {text!r} in column {columns[0]!r}; known classes: {names}")
        return None
    if number != index or not 0 <= index < len(names):
        reasons.append(f"unknown label {text!r} in column {columns[0]!r}; expected a class name in {names} "
                       f"or an index in 0..{len(names) - 1}")
        return None
    return index


def _parse_concepts(record: dict[str, Any], concepts: list[ConceptSpec], reasons: list[str]) -> list[float]:
    values = []
    for spec in concepts:
        raw = record.get(spec.name)
        if _blank(raw):
            values.append(float("nan"))  # not annotated
            continue
        try:
            value = _number(raw)
        except (TypeError, ValueError):
            reasons.append(f"non-numeric concept {spec.name!r}: {raw!r}")
            values.append(float("nan"))
            continue
        if not math.isfinite(value):
            reasons.append(f"non-numeric concept {spec.name!r}: {raw!r}")
        elif spec.kind == "binary" and value not in (0.0, 1.0):
            reasons.append(f"binary concept {spec.name!r} must be 0 or 1, got {raw!r}")
        values.append(value)
    return values


def patient_level_split(rows: list[ManifestRow], fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Assign rows to train/val/test so that no patient (or, without patient ids, no row) is in two splits.

    Rows with an explicit split keep it; the other rows' groups are shuffled with ``seed`` and dealt out by
    ``fractions`` (of the groups). Returns row indices (into ``rows``) per split.
    """
    splits: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    explicit_patients: dict[str, str] = {}
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        key = row.patient if row.patient is not None else f"\0row{row.number}"
        if row.split is not None:
            splits[row.split].append(index)
            if row.patient is not None:
                explicit_patients.setdefault(row.patient, row.split)
        else:
            groups.setdefault(key, []).append(index)
    for key in [k for k in groups if k in explicit_patients]:  # a patient placed explicitly keeps all its rows there
        splits[explicit_patients[key]].extend(groups.pop(key))
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    counts = {name: round(fraction * len(order)) for name, fraction in fractions.items()}
    cursor = 0
    for name in ("test", "val"):
        for key in order[cursor:cursor + counts.get(name, 0)]:
            splits[name].extend(groups[key])
        cursor += counts.get(name, 0)
    for key in order[cursor:]:
        splits["train"].extend(groups[key])
    return splits


def patients_in_two_splits(rows: list[ManifestRow]) -> list[tuple[int, str, str]]:
    """Problems for rows whose patient was given two different explicit splits (a leak between splits)."""
    first: dict[str, tuple[str, int]] = {}
    problems = []
    for row in rows:
        if row.patient is None or row.split is None:
            continue
        split, number = first.setdefault(row.patient, (row.split, row.number))
        if split != row.split:
            problems.append((row.number, row.sample_id, f"patient {row.patient!r} is in split {row.split!r} here "
                                                         f"and in split {split!r} at row {number}"))
    return problems
