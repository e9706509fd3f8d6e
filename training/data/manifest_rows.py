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
import difflib
import io
import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pellucid.models.concepts import ConceptSpec

SPLIT_NAMES = ("train", "val", "test", "predict")
MAX_ID_LENGTH = 128  # ids become file names (<id>.<output>.nii.gz); most file systems allow 255 bytes


class ManifestError(ValueError):
    """The manifest (or an option of its data module) is bad; ``problems`` lists ``(row number, id, reason)``.

    Row number 0 marks a problem of the whole manifest or of an option (no single row is to blame).
    """

    def __init__(self, manifest: str | Path, problems: Sequence[tuple[int, str, str]]) -> None:
        self.manifest = str(manifest)
        self.problems = list(problems)
        lines = [f"row {row} (id {sample_id!r}): {reason}" if row else reason
                 for row, sample_id, reason in self.problems]
        rows = len({row for row, _, _ in self.problems if row})
        head = f"manifest {self.manifest}: " + (f"{rows} bad row(s), {len(self.problems)} problem(s)" if rows
                                                 else f"{len(self.problems)} problem(s)")
        super().__init__(head + "\n  " + "\n  ".join(lines))

    @classmethod
    def whole(cls, manifest: str | Path, reason: str) -> ManifestError:
        """An error about the whole manifest (or an option), not one row."""
        return cls(manifest, [(0, "", reason)])


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
    """Rows of a CSV (UTF-8, with or without Excel's byte-order mark) or JSON manifest as dicts.

    Raises:
        ManifestError: if the manifest is missing, unreadable, malformed, not comma-separated or has no data rows.
    """
    if not path.is_file():
        raise ManifestError.whole(path, f"manifest file not found: {str(path)!r} (resolved to "
                                        f"{str(path.resolve())!r}; a relative path is read from the working folder "
                                        f"{str(Path.cwd())!r}); give an absolute path or run from the folder it is "
                                        "relative to")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ManifestError.whole(path, f"expected a .csv or .json manifest, got suffix {path.suffix!r}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # Excel's "CSV UTF-8" starts with a byte-order mark
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError.whole(path, f"cannot read the manifest as UTF-8 text: {error}; save it as UTF-8 "
                                        "(Excel: 'CSV UTF-8')") from error
    rows = _csv_rows(path, text) if suffix == ".csv" else _json_rows(path, text)
    if not rows:
        raise ManifestError.whole(path, "the manifest has no data rows (empty, or a header only); add one row per "
                                        "image")
    return rows


def _csv_rows(path: Path, text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [name.strip() for name in reader.fieldnames or []]
    if len(header) == 1 and any(sep in header[0] for sep in (";", "\t")):
        separator = "';'" if ";" in header[0] else "a tab"
        raise ManifestError.whole(path, f"the header {header[0]!r} is one column: the file is separated by "
                                        f"{separator}, expected ','; save it as comma-separated CSV (Excel: "
                                        "'CSV UTF-8 (Comma delimited)')")
    return [{str(key).strip(): value for key, value in row.items() if key is not None} for row in reader]


def _json_rows(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError.whole(path, f"malformed JSON at line {error.lineno}, column {error.colno}: "
                                        f"{error.msg}; fix the file (a JSON list of objects, one per image)") from error
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ManifestError.whole(path, f"expected a JSON list of objects or {{'rows': [...]}}, got "
                                        f"{type(data).__name__}")
    return rows


def missing_columns(table: list[dict[str, Any]], columns: dict[str, str | None]) -> list[tuple[int, str, str]]:
    """One problem per named column (``{option: column}``) that no row of the manifest has."""
    present = {key for row in table for key in row}
    return [(0, "", f"column {column!r} ({option}) is not in the manifest; it has {sorted(present)}; set {option} "
                    "to one of them or add the column")
            for option, column in columns.items() if column is not None and column not in present]


def patient_key(patient: str) -> str:
    """How patient ids are compared: spaces trimmed and case ignored (``'P0 '`` and ``'p0'`` are one patient)."""
    return " ".join(patient.split()).casefold()


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
        sample_id = str(record.get(id_column)).strip() if id_column and not _blank(record.get(id_column)) \
            else _stem(str(record.get(image_column) or f"row{number}").strip())
        reasons: list[str] = []
        image = _path(record, image_column, "image", root, reasons)
        if image is None and _blank(record.get(image_column)):
            reasons.append(f"column {image_column!r} is empty or missing")
        label = _parse_label(record, label_columns, class_names, reasons)
        mask = _path(record, mask_column, "mask", root, reasons) if mask_column else None
        values = _parse_concepts(record, concepts, reasons)
        split = None
        if split_column and not _blank(record.get(split_column)):
            split = str(record[split_column]).strip()
            if split not in SPLIT_NAMES:
                reasons.append(f"unknown split {split!r} in column {split_column!r}; expected one of {SPLIT_NAMES}")
        patient = None if not patient_column or _blank(record.get(patient_column)) \
            else " ".join(str(record[patient_column]).split())
        if patient_column and patient is None:
            reasons.append(f"column {patient_column!r} (patient id) is empty or missing")
        problems.extend((number, sample_id, reason) for reason in reasons)
        if not reasons:
            rows.append(ManifestRow(number, sample_id, image, label, mask, values, patient, split))
    problems += _id_problems(rows, id_column)
    return rows, problems


def _path(record: dict[str, Any], column: str, what: str, root: Path, reasons: list[str]) -> Path | None:
    """The file named in ``column``, resolved against ``root``; a missing file names the path given and resolved."""
    value = record.get(column)
    if _blank(value):
        return None
    given = str(value).strip()
    path = Path(given) if Path(given).is_absolute() else root / given
    if not path.exists():
        where = "" if Path(given).is_absolute() else f" (relative paths resolve against {str(root)!r})"
        reasons.append(f"missing file: {what} {given!r} in column {column!r}, resolved to "
                       f"{str(path.resolve())!r}, does not exist{where}")
    return path


def _id_problems(rows: list[ManifestRow], id_column: str | None) -> list[tuple[int, str, str]]:
    """Duplicate and over-long sample ids (ids name output files, so they must be unique and short enough)."""
    fix = "give each row its own id in an id column (id_column)" if id_column is None \
        else f"make column {id_column!r} unique"
    problems = []
    first: dict[str, int] = {}
    for row in rows:
        if len(row.sample_id) > MAX_ID_LENGTH:
            problems.append((row.number, row.sample_id[:40] + "...", f"sample id has {len(row.sample_id)} "
                             f"characters, expected at most {MAX_ID_LENGTH} (ids name output files); {fix} with "
                             "shorter ids"))
        seen = first.setdefault(row.sample_id, row.number)
        if seen != row.number:
            source = "the image file name" if id_column is None else f"column {id_column!r}"
            problems.append((row.number, row.sample_id, f"duplicate sample id {row.sample_id!r} (from {source}): "
                             f"row {seen} has it too; {fix}"))
    return problems


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


def single_sample_classes(rows: list[ManifestRow], class_names: list[str],
                          column: str) -> list[tuple[int, str, str]]:
    """Rows whose class (derived from the data, not declared) has no other sample while another class has several.

    Such a class is most often a label typo (``bengin`` among ``benign``); declaring ``class_names`` keeps it.
    """
    counts = Counter(row.label for row in rows if isinstance(row.label, int))
    problems = []
    for row in rows:
        if isinstance(row.label, int) and counts[row.label] == 1 and max(counts.values()) > 1:
            name = class_names[row.label]
            others = [c for c in class_names if c != name]
            near = difflib.get_close_matches(name, others, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append((row.number, row.sample_id, f"label {name!r} in column {column!r} is the only sample "
                             f"of its class{hint}; fix the label, or list every class in class_names to keep a "
                             "one-sample class"))
    return problems


def patient_level_split(rows: list[ManifestRow], fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Assign rows to train/val/test so that no patient (or, without patient ids, no row) is in two splits.

    Rows with an explicit split keep it. The other rows' groups (patients, compared by :func:`patient_key`) are
    stratified by label: each group's stratum is its most frequent class; ``round(fraction * groups)`` groups go to
    test and to val, shared out over the strata in proportion (largest remainder), and every stratum keeps at least
    one group in train, so no class lands only in test or val. Within a stratum, groups are shuffled with ``seed``.
    Returns row indices (into ``rows``) per split.
    """
    splits: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    explicit_patients: dict[str, str] = {}
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        key = patient_key(row.patient) if row.patient is not None else f"\0row{row.number}"
        if row.split is not None:
            splits[row.split].append(index)
            explicit_patients.setdefault(key, row.split)
        else:
            groups.setdefault(key, []).append(index)
    for key in [k for k in groups if k in explicit_patients]:  # a patient placed explicitly keeps all its rows there
        splits[explicit_patients[key]].extend(groups.pop(key))
    strata: dict[str, list[str]] = {}
    for key in sorted(groups):
        strata.setdefault(_stratum(rows, groups[key]), []).append(key)
    generator = random.Random(seed)
    for members in strata.values():
        generator.shuffle(members)
    spare = {stratum: len(members) - 1 for stratum, members in strata.items()}  # one group per stratum stays in train
    taken = dict.fromkeys(strata, 0)
    for name in ("test", "val"):
        shares = _shares({s: len(m) for s, m in strata.items()}, spare, round(fractions.get(name, 0.0) * len(groups)))
        for stratum, count in shares.items():
            for key in strata[stratum][taken[stratum]:taken[stratum] + count]:
                splits[name].extend(groups[key])
            taken[stratum] += count
            spare[stratum] -= count
    for stratum, members in strata.items():
        for key in members[taken[stratum]:]:
            splits["train"].extend(groups[key])
    return {name: sorted(indices) for name, indices in splits.items()}


def _stratum(rows: list[ManifestRow], indices: list[int]) -> str:
    """A group's stratum: its most frequent class (ties: the lower index); multi-label and unlabelled: one stratum."""
    labels = Counter(rows[i].label for i in indices if isinstance(rows[i].label, int))
    return "" if not labels else str(min(labels, key=lambda label: (-labels[label], label)))


def _shares(sizes: dict[str, int], capacity: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over strata in proportion to ``sizes`` (largest remainder), at most ``capacity`` each."""
    whole = sum(sizes.values())
    quota = {s: total * n / whole if whole else 0.0 for s, n in sizes.items()}
    shares = {s: min(int(quota[s]), capacity[s]) for s in sizes}
    for stratum in sorted(sizes, key=lambda s: (-(quota[s] - int(quota[s])), s)) * 2:
        if sum(shares.values()) >= total:
            break
        if shares[stratum] < capacity[stratum]:
            shares[stratum] += 1
    return shares


def patients_in_two_splits(rows: list[ManifestRow]) -> list[tuple[int, str, str]]:
    """Problems for rows whose patient was given two different explicit splits (a leak between splits)."""
    first: dict[str, tuple[str, int]] = {}
    problems = []
    for row in rows:
        if row.patient is None or row.split is None:
            continue
        split, number = first.setdefault(patient_key(row.patient), (row.split, row.number))
        if split != row.split:
            problems.append((row.number, row.sample_id, f"patient {row.patient!r} is in split {row.split!r} here "
                                                         f"and in split {split!r} at row {number}"))
    return problems


def check_options(manifest: Path, spatial_dims: int, spacing_mm: Sequence[float] | None,
                  spatial_size: Sequence[int] | None, intensity_range: Sequence[float] | None) -> None:
    """Refuse geometry and intensity options that cannot work, before any image is read.

    Raises:
        ManifestError: naming every bad option with its expected and actual value.
    """
    problems = []
    if spacing_mm is not None and (len(spacing_mm) != spatial_dims or not all(_positive(v) for v in spacing_mm)):
        problems.append(f"option spacing_mm must be {spatial_dims} finite values > 0 (mm per voxel along each "
                        f"axis), got {list(spacing_mm)}; e.g. spacing_mm: {[1.0] * spatial_dims}")
    if spatial_size is not None and (len(spatial_size) != spatial_dims or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in spatial_size)):
        problems.append(f"option spatial_size must be {spatial_dims} whole numbers > 0 (voxels along each axis), "
                        f"got {list(spatial_size)}; e.g. spatial_size: {[64] * spatial_dims}")
    if intensity_range is not None and (len(intensity_range) != 2 or not all(
            _positive(abs(v) + 1) for v in intensity_range) or not intensity_range[0] < intensity_range[1]):
        problems.append(f"option intensity_range must be [low, high] with low < high, got {list(intensity_range)}; "
                        "e.g. intensity_range: [-1000, 400] for CT in HU")
    if problems:
        raise ManifestError(manifest, [(0, "", problem) for problem in problems])


def _positive(value: Any) -> bool:
    try:
        number = _number(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number > 0
