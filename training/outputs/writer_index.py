"""The index of an explanation folder: per-process shards, their merge into ``index.csv``, atomic files.

Each process appends its rows to ``<out>/.index-shards/rank-<r>.jsonl`` after the sample's files are in place; rank 0
merges every shard into ``index.csv`` at the end (:func:`merge_index`). Every file goes through :func:`atomic_write`.
See :mod:`pellucid.training.outputs.writer` for the design.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

SHARD_FOLDER = ".index-shards"
INDEX_FILE = "index.csv"


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None], temporary_tag: str = "") -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace`` it into place.

    Args:
        path: Final file.
        write: Writes the content to the open binary file it is given.
        temporary_tag: Inserted into the temporary name (e.g. ``rank0``) so processes never share one.

    Raises:
        Whatever ``write`` raises; the temporary file is removed first and ``path`` is untouched.
    """
    temporary = path.with_name(f".{path.name}.{temporary_tag}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_shard(path: Path) -> list[dict[str, Any]]:
    """Rows of one index shard; a torn last line (no newline: a crash mid-append) is ignored.

    Raises:
        ValueError: naming the file and line when a complete line is not valid JSON.
    """
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is empty, or torn
    rows = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: corrupt index row ({error.msg}); remove the line or the file") \
                from error
    return rows


def shard_rows(folder: Path) -> list[dict[str, Any]]:
    """Every row of every process's shard, in rank order."""
    rows: list[dict[str, Any]] = []
    for path in sorted((folder / SHARD_FOLDER).glob("rank-*.jsonl")):
        rows.extend(read_shard(path))
    return rows


def earlier_rows(folder: Path) -> list[dict[str, Any]]:
    """The rows an earlier run listed (shards and ``index.csv``), tolerating corrupt shards."""
    rows: list[dict[str, Any]] = []
    for path in (folder / SHARD_FOLDER).glob("*.jsonl"):
        try:
            rows.extend(read_shard(path))
        except ValueError:
            continue
    if (folder / INDEX_FILE).is_file():
        rows.extend(read_index(folder))
    return rows


def merge_index(folder: Path, temporary_tag: str) -> Path:
    """Write ``index.csv`` from every shard: one row per id (first shard wins), columns in first-seen order."""
    rows, seen = [], set()
    for row in shard_rows(folder):
        if row["id"] not in seen:
            seen.add(row["id"])
            rows.append(flatten_row(row))
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue().encode("utf-8")
    atomic_write(folder / INDEX_FILE, lambda handle: handle.write(data), temporary_tag)
    return folder / INDEX_FILE


def flatten_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One shard row as flat CSV columns (provenance as JSON text)."""
    flat: dict[str, Any] = {"id": row["id"], "file": row["file"], "nifti": ";".join(row.get("nifti", []))}
    if "dicom" in row:
        flat["dicom"] = ";".join(row["dicom"])
    flat.update({key: row[key] or "" for key in ("checkpoint_sha256", "weights_sha256") if key in row})
    if "prediction" in row:
        flat["prediction"] = row["prediction"]
        if "predicted_index" in row:
            flat["predicted_index"] = row["predicted_index"]
        flat.update({f"prob:{name}": value for name, value in row["probabilities"].items()})
    for rank, entry in enumerate(row.get("prototypes", []), start=1):
        flat[f"prototype_{rank}"] = entry["prototype"]
        flat[f"prototype_{rank}_similarity"] = entry["similarity"]
        flat[f"prototype_{rank}_provenance"] = "" if entry["provenance"] is None else json.dumps(entry["provenance"])
    for concept in row.get("concepts", []):
        unit = f" [{concept['unit']}]" if concept["unit"] else ""
        flat[f"concept:{concept['name']}{unit}"] = concept["value"]
    if row.get("interventions"):  # the corrections applied (concept -> value in its unit), as JSON text
        flat["interventions"] = json.dumps(row["interventions"], sort_keys=True)
        flat["prediction_without_interventions"] = row.get("prediction_without_interventions", "")
    return flat


def read_index(output_dir: str | Path) -> list[dict[str, str]]:
    """Rows of ``<output_dir>/index.csv`` as dicts of strings."""
    with open(Path(output_dir) / INDEX_FILE, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))

